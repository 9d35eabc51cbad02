"""`fedtune node-keys`: an institution makes its own keys, on its own machine.

    OUT/supernode, OUT/supernode.pub       its SuperNode's ECDSA P-384 key pair (OpenSSH); the .pub goes
                                           to the coordinator, who registers it (`flwr supernode register`)
    LEDGER/ledger.key, LEDGER/ledger.pub   (with --ledger-dir) its ledger's Ed25519 signing key pair;
                                           the .pub goes to the auditor

The private keys never leave the institution, so neither the coordinator nor whoever holds its
folder can act as this node or sign this node's ledger. Private keys are written owner-only
(0600), public keys 0644, and an existing key is never replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.chain import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, create_ledger_keys
from fedtune.common.storage import atomic_write

SUPERNODE_KEY = "supernode"
PRIVATE, PUBLIC = 0o600, 0o644
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")  # one token: the .pub's comment must not break its line


@dataclass(frozen=True)
class NodeKeys:
    supernode_key: Path  # stays here
    supernode_public_key: Path  # to the coordinator
    ledger_key: Path | None  # stays here
    ledger_public_key: Path | None  # to the auditor


def make_node_keys(*, out: Path, ledger_dir: Path | None = None, name: str = "supernode") -> NodeKeys:
    """The SuperNode key pair in `out` and, with `ledger_dir`, the ledger key pair there.

    Everything is checked before anything is written, so a refusal leaves no half-made set.
    """
    if not _NAME.fullmatch(name):
        raise FedtuneError(f"--name {name!r} must be one word of letters, digits and ._@+- (at most 64), "
                           f"e.g. hospital-a: it becomes the comment of the public key the coordinator registers")
    out = Path(out)
    private = out / SUPERNODE_KEY
    public = private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists():
            raise FedtuneError(f"{path} already exists; a SuperNode key is never replaced. Keep using it (the "
                               f"coordinator registered its .pub), or choose another --out on purpose and send "
                               f"the new .pub to the coordinator")
    if ledger_dir is not None:
        for path in (Path(ledger_dir) / PRIVATE_KEY_FILE, Path(ledger_dir) / PUBLIC_KEY_FILE):
            if path.exists():
                raise FedtuneError(f"{path} already exists; a ledger key is never replaced (the auditor pinned its "
                                   f".pub). Drop --ledger-dir to make only the SuperNode key, or choose an empty "
                                   f"--ledger-dir on purpose")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_supernode_pair(private=private, public=public, name=name)
    if ledger_dir is None:
        return NodeKeys(supernode_key=private, supernode_public_key=public, ledger_key=None, ledger_public_key=None)
    ledger_public = create_ledger_keys(Path(ledger_dir))  # the very code a Ledger uses on first use
    return NodeKeys(supernode_key=private, supernode_public_key=public,
                    ledger_key=Path(ledger_dir) / PRIVATE_KEY_FILE, ledger_public_key=ledger_public)


def _write_supernode_pair(*, private: Path, public: Path, name: str) -> None:
    """OpenSSH, as flower-supernode reads the private key and `flwr supernode register` the public one."""
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    try:
        atomic_write(private, pem, mode=PRIVATE, exclusive=True)  # owner-only from the first byte, never replaced
    except FileExistsError:
        raise FedtuneError(f"{private} was created by another process at the same time; use that key") from None
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write(public, line + f" {name}\n".encode(), mode=PUBLIC)
