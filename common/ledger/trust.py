"""What an audit's verdict rests on, said plainly beside it.

A ledger verifies under some key. Pinned by the auditor (`--public-key`), or covered by a
receipt the institution signed (`--receipt`), the key is the institution's word. Taken from
beside the ledger, it is whatever the holder of the run directory left there: such a ledger is
consistent, and could have been re-signed. In a simulation the private keys themselves sit in
the run directory, so one operator could have written every ledger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from common.ledger.chain import PRIVATE_KEY_FILE


class KeyUse(Protocol):
    owner: str
    key_pinned: bool
    receipted: bool


def trust_statement(checks: list[KeyUse], ledgers: dict[str, Path]) -> list[str]:
    lines = []
    pinned = [c.owner for c in checks if c.key_pinned]
    receipted = [c.owner for c in checks if c.receipted]
    beside = [c.owner for c in checks if not c.key_pinned and not c.receipted]
    if pinned:
        lines.append(f"key pinned by the auditor: {', '.join(pinned)}")
    if receipted:
        lines.append(f"covered by the institution's own receipt: {', '.join(receipted)}")
    if beside:
        lines.append(f"key taken from beside the ledger (could have been re-signed by whoever holds these "
                     f"files; pin it with --public-key or ask for a receipt): {', '.join(beside)}")
    if "server" in ledgers:
        lines.append("server: the coordinator's own record; its key is the operator's")
    private = [owner for owner, path in ledgers.items() if (Path(path).parent / PRIVATE_KEY_FILE).exists()]
    if private:
        lines.append(f"the private ledger keys of {', '.join(private)} are inside this directory (a simulation: "
                     f"one operator held every key), so this audit shows the run is consistent, not that "
                     f"independent institutions attest it")
    return lines
