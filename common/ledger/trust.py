"""What an audit's verdict rests on, said plainly beside it.

A ledger verifies under some key. Pinned by the auditor (`--public-key`, a key the institution
handed over itself), the key is the institution's word, and so is a receipt (`--receipt`) that
verifies under it. Taken from beside the ledger, it is whatever the holder of the run directory
left there: such a ledger is consistent, and could have been re-signed, and a receipt that
verifies under it could have been made by the same hand. In a simulation the private keys
themselves sit in the run directory, so one operator could have written every ledger and every
receipt: a key whose private half is found there attests nothing, pinned or not. The coordinator's
own key lies beside the server ledger in every run, deployed or simulated: only an institution's
private key in the directory makes it a simulation.
The verdict (common/ledger/audit.py) says "clean" only when every client ledger is attested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.common.ledger.chain import PRIVATE_KEY_FILE, public_key_fingerprint

MAX_KEY_FILES = 1_000  # a run directory holds one per ledger
MAX_KEY_BYTES = 16_384  # a PEM Ed25519 key is about 120 bytes


class KeyUse(Protocol):
    owner: str
    key_pinned: bool
    receipted: bool
    receipt_unattested: bool
    private_key_inside: bool


def private_key_fingerprints(target: Path) -> set[str]:
    """Fingerprints of the public halves of every ledger private key inside `target` (a run directory,
    a ledger directory, or the directory of a ledger file)."""
    root = Path(target) if Path(target).is_dir() else Path(target).parent
    found: set[str] = set()
    for index, path in enumerate(root.rglob(PRIVATE_KEY_FILE)):
        if index >= MAX_KEY_FILES:
            break
        try:
            data = path.read_bytes() if path.stat().st_size <= MAX_KEY_BYTES else b""
            key = serialization.load_pem_private_key(data, password=None)
        except (OSError, ValueError, TypeError):
            continue
        if isinstance(key, Ed25519PrivateKey):
            found.add(public_key_fingerprint(key.public_key()))
    return found


def trust_statement(checks: list[KeyUse], ledgers: dict[str, Path]) -> list[str]:
    lines = []
    pinned = [c.owner for c in checks if c.key_pinned and not c.private_key_inside]
    pinned_inside = [c.owner for c in checks if c.key_pinned and c.private_key_inside]
    receipted = [c.owner for c in checks if c.receipted]
    unattested = [c.owner for c in checks if c.receipt_unattested]
    beside = [c.owner for c in checks if not c.key_pinned]
    if pinned:
        lines.append(f"key pinned by the auditor: {', '.join(pinned)}")
    if pinned_inside:
        lines.append(f"key pinned by the auditor, but its private half is inside this directory (not an "
                     f"institution's attestation): {', '.join(pinned_inside)}")
    if receipted:
        lines.append(f"covered by the institution's own receipt, under its pinned key: {', '.join(receipted)}")
    if unattested:
        lines.append(f"receipt agrees with the ledger, but verifies only under a key from this directory (not an "
                     f"institution's attestation: pin the institution's own ledger.pub with --public-key): "
                     f"{', '.join(unattested)}")
    if beside:
        lines.append(f"key taken from beside the ledger (could have been re-signed by whoever holds these "
                     f"files; pin it with --public-key and ask for a receipt): {', '.join(beside)}")
    if "server" in ledgers:
        lines.append("server: the coordinator's own record; its key is the operator's")
    private = [owner for owner, path in ledgers.items() if (Path(path).parent / PRIVATE_KEY_FILE).exists()]
    if any(owner != "server" for owner in private):  # an institution's key here: the coordinator's is always
        lines.append(f"the private ledger keys of {', '.join(private)} are inside this directory (a simulation: "
                     f"one operator held every key), so this audit shows the run is consistent, not that "
                     f"independent institutions attest it")
    else:
        lines += _deployment_basis(checks)
    return lines


def _deployment_basis(checks: list[KeyUse]) -> list[str]:
    """A deployment's basis, once every client ledger is attested: the institutions' keys and receipts.
    The coordinator's own private key lying beside the server ledger is no simulation: it is its own."""
    clients = [c for c in checks if c.owner != "server"]
    if not clients or not all(c.key_pinned and not c.private_key_inside for c in clients):
        return []
    receipted = [c.owner for c in clients if c.receipted]
    line = (f"every client ledger verifies under the key its institution gave the auditor (pinned), whose "
            f"private half is not in this directory; ")
    if len(receipted) == len(clients):
        return [line + "every one is covered by the institution's own receipt: the verdict rests on the "
                       "institutions' keys and receipts, not on the operator's files"]
    missing = ", ".join(c.owner for c in clients if not c.receipted)
    return [line + f"no receipt from {missing}: the verdict rests on the institutions' keys, and a directory "
                   f"rolled back to an earlier round would still verify for those (ask each for `fedtune receipt`)"]
