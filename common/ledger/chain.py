"""Append-only, hash-chained, Ed25519-signed ledgers (one JSON record per line).

Each record carries `seq` (its position), `prev_hash` (SHA-256 of the previous record's
canonical JSON, signature included) and `signature` (Ed25519 over its own canonical JSON
without the signature). Editing, deleting, reordering or splicing records, or swapping the key,
breaks a hash or a signature at a record the verifier can name. Removing the *last* records
breaks nothing inside the file: the owner keeps a head marker (`ledger.head`) and refuses a
ledger shorter than it, and the auditor compares against the server's ledger, which records
each client's head hash per round.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.common.errors import FedtuneError
from fedtune.common.storage import append_line, atomic_write, json_safe

LEDGER_FILE = "ledger.jsonl"
PRIVATE_KEY_FILE = "ledger.key"
PUBLIC_KEY_FILE = "ledger.pub"
HEAD_FILE = "ledger.head"  # seq and hash of the last record: a truncated ledger no longer matches it
GENESIS = "0" * 64


class LedgerError(FedtuneError):
    """A ledger that fails verification: the owner must not trust (or extend) it."""


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def record_hash_or_none(record: dict[str, Any]) -> str | None:
    """The hash of a record read for auditing, or None when it is not canonical JSON (an edited
    record: the chain check reports it)."""
    try:
        return record_hash(record)
    except (TypeError, ValueError):
        return None


def _unsigned(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "signature"}


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise FedtuneError(f"public key file not found: {path}") from None
    except ValueError:
        raise FedtuneError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FedtuneError(f"{path} is not an Ed25519 public key")
    return key


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Parse a ledger file; a line that is not a JSON object is named in the error."""
    if not path.is_file():
        raise FedtuneError(f"ledger file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FedtuneError(f"{path} is not UTF-8 text (byte {exc.start}): not a ledger, or corrupted") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FedtuneError(f"{path} line {number} is not valid JSON ({exc.msg}): truncated or edited") from None
        except RecursionError:  # thousands of nested brackets: no ledger record nests more than a few levels
            raise FedtuneError(f"{path} line {number} nests too deep for a ledger record: edited") from None
        if not isinstance(record, dict):
            raise FedtuneError(f"{path} line {number} is not a JSON object")
        records.append(record)
    return records


@dataclass
class Verification:
    """The outcome of checking one ledger's chain and signatures."""

    path: Path
    records: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_records(path: Path, records: list[dict[str, Any]], key: Ed25519PublicKey) -> Verification:
    result = Verification(path=path, records=records)
    previous = GENESIS
    for index, record in enumerate(records):
        name = f"{path.parent.name} record {index + 1} (round {record.get('round', '?')})"
        if record.get("seq") != index:
            result.problems.append(f"{name}: sequence number {record.get('seq')} where {index} was expected "
                                   f"(a record was deleted, inserted or reordered)")
        if record.get("prev_hash") != previous:
            result.problems.append(f"{name}: previous-record hash does not match (chain broken)")
        try:
            body = canonical(_unsigned(record))
            previous = record_hash(record)
        except (TypeError, ValueError):  # NaN/Infinity were never written by a ledger
            result.problems.append(f"{name}: not canonical JSON (NaN or Infinity); the record was edited")
            previous = ""
            continue
        try:
            signature = base64.b64decode(str(record.get("signature", "")), validate=True)
            key.verify(signature, body)
        except (InvalidSignature, ValueError):
            result.problems.append(f"{name}: signature does not verify under the ledger's public key")
    return result


def create_ledger_keys(directory: Path) -> Path:
    """Create a ledger's Ed25519 key pair in `directory`; return the public key's path.

    The one place a ledger key is made, whether by `Ledger` on first use or by an institution
    ahead of time (`fedtune node-keys`) so it can hand ledger.pub to its auditor before any run.
    Refuses when either file exists: a replaced key would orphan the records it signed and no
    longer match the public key an auditor pinned.
    """
    directory = Path(directory)
    private, public = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if private.exists():
        raise LedgerError(f"{private} already exists; a ledger key is never replaced (keep using it, "
                          f"or choose an empty directory on purpose)")
    if public.exists():
        raise LedgerError(f"{public} exists but its private key {private} is missing; restore it rather than "
                          f"make a key the auditor does not know (or choose an empty directory on purpose)")
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        atomic_write(private, pem, mode=0o600, exclusive=True)  # never world-readable, never overwritten
    except FileExistsError:
        raise LedgerError(f"{private} was created by another process at the same time; use that key") from None
    atomic_write(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def signing_key(directory: Path) -> Ed25519PrivateKey:
    """The ledger's Ed25519 key in `directory`, made on first use. It is also the institution's
    identity in secure aggregation: the roster pins its public half."""
    directory = Path(directory)
    private = directory / PRIVATE_KEY_FILE
    if not private.exists():
        if (directory / LEDGER_FILE).exists():
            raise LedgerError(f"{directory / LEDGER_FILE} exists but its signing key {private} is missing; "
                              f"the ledger cannot be extended")
        create_ledger_keys(directory)
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{private} is not an Ed25519 private key")
    return key


class Ledger:
    """One party's ledger in `directory`, with its key pair created beside it on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LEDGER_FILE
        self._key = self._load_or_create_key()
        self.public_key = self._key.public_key()
        self.records = self._verified_records()

    def _load_or_create_key(self) -> Ed25519PrivateKey:
        return signing_key(self.directory)

    def _verified_records(self) -> list[dict[str, Any]]:
        head_path = self.directory / HEAD_FILE
        head = json.loads(head_path.read_text()) if head_path.exists() else {"seq": -1, "hash": GENESIS}
        records = read_records(self.path) if self.path.exists() else []
        check = verify_records(self.path, records, self.public_key)
        if not check.ok:
            raise LedgerError(f"ledger {self.path} failed verification: {check.problems[0]}; "
                              f"refusing to train on a ledger that may under-count privacy spend")
        last_hash = record_hash(records[-1]) if records else GENESIS
        before_last = record_hash(records[-2]) if len(records) > 1 else GENESIS
        if records and head.get("seq") == len(records) - 2 and head.get("hash") == before_last:
            # Killed between appending a (verified, signed) record and moving the head: keep the
            # record. It can only over-count spend, never hide it.
            self._write_head(records[-1])
            head = {"seq": len(records) - 1, "hash": last_hash}
        if head.get("seq") != len(records) - 1 or head.get("hash") != last_hash:
            raise LedgerError(f"ledger {self.path} holds {len(records)} records but its head marker "
                              f"{head_path.name} says {head.get('seq', -1) + 1}: records were removed or the file "
                              f"was replaced; refusing to train on a ledger that may under-count privacy spend")
        return check.records

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Sign and append one record; it is on disk (fsync) before this returns."""
        record = json_safe(dict(fields))
        record["seq"] = len(self.records)
        record["prev_hash"] = record_hash(self.records[-1]) if self.records else GENESIS
        record["signature"] = base64.b64encode(self._key.sign(canonical(record))).decode()
        append_line(self.path, canonical(record).decode())
        self.records.append(record)
        self._write_head(record)
        return record

    def sign(self, statement: bytes) -> bytes:
        """Sign a tagged statement about this ledger (a receipt) with the ledger key."""
        return self._key.sign(statement)

    def _write_head(self, record: dict[str, Any]) -> None:
        atomic_write(self.directory / HEAD_FILE, json.dumps({"seq": record["seq"], "hash": record_hash(record)}))

    @property
    def head_hash(self) -> str:
        return record_hash(self.records[-1]) if self.records else GENESIS
