"""The federation's roster: institution id -> Ed25519 identity public key, pinned by every node.

Institutions exchange their identity keys (the ledger's public key, `ledger.pub`) out of band and
each pins the same roster file; `fedtune roster build` writes it and prints its fingerprint, which
institutions compare by phone or letter. A node refuses a SecAgg+ round in which any peer's masking
keys are unsigned, mis-signed, or signed by an institution the roster does not list, so the
coordinator cannot join the aggregation as a fake peer or substitute a peer's keys.

A roster expires: a federation that changes members writes a new one rather than trusting an old
file forever. Every error names what to fix in one line and never quotes a key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.common.errors import FedtuneError
from fedtune.common.storage import atomic_write

ROSTER_FORMAT = "fedtune-roster-1"
INSTITUTION_ID = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
_FIX = "rebuild it with `fedtune roster build` and compare its fingerprint with the other institutions"
NO_ROSTER = ("this node has no roster: set node config roster='PATH' to the federation's roster (`fedtune roster "
             "build`), which pins every institution's identity key")


class RosterError(FedtuneError):
    """A roster this node cannot use; the message says what to fix."""


@dataclass(frozen=True)
class Roster:
    federation: str
    expires: dt.date
    members: dict[str, bytes]  # institution id -> raw 32-byte Ed25519 public key
    fingerprint: str

    @classmethod
    def load(cls, path: Path | str) -> Roster:
        from fedtune.common.bounded_json import TooLarge, read_json_file  # a roster comes from another party

        path = Path(path)
        try:
            data = read_json_file(path)  # bounded in size and nesting
        except FileNotFoundError:
            raise RosterError(f"roster {path} not found: ask the federation for its roster file and set "
                              f"node config roster='PATH'") from None
        except TooLarge as exc:
            raise RosterError(f"roster {path} is {exc}, which no roster is; {_FIX}") from None
        except (OSError, UnicodeDecodeError, ValueError):
            raise RosterError(f"roster {path} is not a readable JSON file; {_FIX}") from None
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: object, *, source: str = "roster") -> Roster:
        if not isinstance(data, dict) or data.get("format") != ROSTER_FORMAT:
            raise RosterError(f"{source} is not a {ROSTER_FORMAT} file; {_FIX}")
        members = data.get("members")
        if not isinstance(members, dict) or not members:
            raise RosterError(f"{source} lists no members; {_FIX}")
        keys = {}
        for institution, encoded in members.items():
            if not INSTITUTION_ID.fullmatch(str(institution)):
                raise RosterError(f"{source}: a member id is not one word of letters, digits and ._@+-; {_FIX}")
            try:
                raw = base64.b64decode(str(encoded), validate=True)
                Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                raise RosterError(f"{source}: the key of member {institution} is not an Ed25519 public key; "
                                  f"{_FIX}") from None
            keys[str(institution)] = raw
        if len(set(keys.values())) != len(keys):
            raise RosterError(f"{source}: two members share one key; {_FIX}")
        try:
            expires = dt.date.fromisoformat(str(data.get("expires")))
        except ValueError:
            raise RosterError(f"{source} has no valid 'expires' date (YYYY-MM-DD); {_FIX}") from None
        canonical = json.dumps({"format": ROSTER_FORMAT, "federation": str(data.get("federation", "")),
                                "expires": expires.isoformat(),
                                "members": {k: base64.b64encode(v).decode() for k, v in sorted(keys.items())}},
                               sort_keys=True, separators=(",", ":")).encode()
        return cls(federation=str(data.get("federation", "")), expires=expires, members=keys,
                   fingerprint=fingerprint_of(canonical))

    @classmethod
    def of_members(cls, members: dict[str, bytes], *, federation: str, expires: dt.date) -> Roster:
        """A roster of raw public keys (checked exactly as a loaded one)."""
        return cls.from_json({"format": ROSTER_FORMAT, "federation": federation, "expires": expires.isoformat(),
                              "members": {k: base64.b64encode(v).decode() for k, v in members.items()}})

    def write(self, path: Path) -> None:
        atomic_write(Path(path), (json.dumps(self.to_json(), indent=2) + "\n").encode())

    def to_json(self) -> dict:
        return {"format": ROSTER_FORMAT, "federation": self.federation, "expires": self.expires.isoformat(),
                "members": {k: base64.b64encode(v).decode() for k, v in sorted(self.members.items())}}

    def problem_for(self, *, institution: str, own_key: bytes, today: dt.date | None = None) -> str | None:
        """Why this node cannot take part under this roster, or None."""
        today = today or dt.datetime.now(dt.timezone.utc).date()
        if today > self.expires:
            return f"the roster expired on {self.expires.isoformat()}; {_FIX}"
        if institution not in self.members:
            return f"the roster does not list this node ({institution}); {_FIX}"
        if self.members[institution] != own_key:
            return (f"the roster lists another key for this node ({institution}) than its ledger.pub; {_FIX}")
        return None

    def verifies(self, *, institution: str, statement: bytes, signature: bytes) -> bool:
        """Whether `institution` is a member and signed `statement`."""
        raw = self.members.get(institution)
        if raw is None:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, statement)
        except InvalidSignature:
            return False
        return True


def fingerprint_of(canonical: bytes) -> str:
    digest = hashlib.sha256(canonical).hexdigest()[:32]
    return " ".join(digest[i:i + 4] for i in range(0, len(digest), 4))


def public_key_file(path: Path | str) -> bytes:
    """The raw Ed25519 key of an institution's ledger.pub (PEM), as a roster holds it."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise RosterError(f"public key file not found: {path}") from None
    except ValueError:
        raise RosterError(f"{path} is not a PEM public key (an institution's ledger.pub)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise RosterError(f"{path} is not an Ed25519 public key (an institution's ledger.pub)")
    return key.public_bytes_raw()
