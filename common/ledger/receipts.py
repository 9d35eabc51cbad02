"""Receipts: what an institution signs about its own ledger, so an auditor need not trust the run directory.

The operator who holds a run directory can truncate a ledger, roll the whole directory back, or
(in simulation, or with the server's key) re-sign records. A receipt is the institution's word,
obtained by the auditor from the institution directly: "for run R my ledger held N records, the
last of them hashing to H, my cumulative epsilon was E, and these are the rounds it covers".
`fedtune receipt` writes one at the node; `fedtune audit RUN --receipt FILE` compares.

A receipt is signed by the ledger key (the institution's identity key), over a tagged canonical
JSON body: it cannot be mistaken for a ledger record or a SecAgg+ statement signed by that key.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.common.bounded_json import TooLarge, read_json_file
from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.chain import (LEDGER_FILE, Ledger, canonical, public_key_fingerprint, record_hash,
                                 record_hash_or_none)
from fedtune.common.storage import atomic_write

RECEIPT_TAG = b"fedtune ledger receipt v1\n"
FORMAT = "fedtune-receipt/1"
MAX_LISTED_RUNS = 20  # an error names a ledger's newest runs, not every run it ever held
MAX_RUN_ID_CHARS = 80  # fedtune's ids are 32 hex digits; a longer one is cut when printed


@dataclass(frozen=True)
class Receipt:
    client_id: str
    run_id: str
    records: int  # the ledger's length when the receipt was signed (every run's records)
    head_hash: str  # the hash of its last record
    last_round: int  # the last round of `run_id` it recorded
    epsilon: float | None  # cumulative epsilon after its last DP record (None: never trained with DP)
    rounds: tuple[tuple[int, int, str, str], ...]  # (seq, round, status, record hash) of each record of the run

    def statement(self) -> bytes:
        return RECEIPT_TAG + canonical(asdict(self))


def make_receipt(*, ledger_dir: Path, run_id: str | None = None) -> dict:
    """The signed receipt of the ledger in `ledger_dir` for `run_id` (None: the ledger's only run),
    as written to a file.

    Opening the ledger verifies its chain, signatures and head marker first: an institution never
    signs a receipt for a ledger that fails its own checks."""
    if not (Path(ledger_dir) / LEDGER_FILE).is_file():  # never make a key in a mistyped directory
        raise FedtuneError(f"{ledger_dir} holds no {LEDGER_FILE}: give the node's ledger-dir")
    ledger = Ledger(Path(ledger_dir))
    records = ledger.records
    run_id = run_id if run_id is not None else only_run(records, ledger_dir)
    own = [(index, record) for index, record in enumerate(records) if record.get("run_id") == run_id]
    if not own:
        flower = " (a number: Flower's run id, not fedtune's)" if run_id.isdigit() else ""
        raise FedtuneError(f"the ledger in {ledger_dir} has no record of run {printable(run_id)}{flower}; "
                           f"{runs_held(records)}")
    epsilons = [r["epsilon"] for r in records if r.get("dp") and r.get("epsilon") is not None]
    client_id = str(own[-1][1].get("client_id", Path(ledger_dir).name))
    receipt = Receipt(client_id=client_id, run_id=run_id, records=len(records), head_hash=ledger.head_hash,
                      last_round=int(own[-1][1]["round"]), epsilon=epsilons[-1] if epsilons else None,
                      rounds=tuple((i, int(r["round"]), str(r["status"]), record_hash(r)) for i, r in own))
    signature = ledger.sign(receipt.statement())
    return {"format": FORMAT, "receipt": asdict(receipt), "signature": base64.b64encode(signature).decode(),
            "key_fingerprint": public_key_fingerprint(ledger.public_key)}


def ledger_run_ids(records: list[dict]) -> list[str]:
    """fedtune's run ids a ledger's records name, each once, in the order the runs began (newest
    last). Evaluation answers are left out when other records exist: a node keys them by Flower's run
    id (client/fl_client.py), which is not the id `fedtune receipt` takes."""
    named = [(r.get("run_id"), r.get("request", "fit")) for r in records]
    runs = [run for run, request in named if request != "evaluate"] or [run for run, _ in named]
    return list(dict.fromkeys(run for run in runs if isinstance(run, str) and run))


def only_run(records: list[dict], ledger_dir: Path) -> str:
    """The ledger's one run, for a receipt given no run id; otherwise an error listing the runs."""
    runs = ledger_run_ids(records)
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise FedtuneError(f"the ledger in {ledger_dir} holds no run yet: this node has not trained or refused "
                           f"a round")
    raise FedtuneError(f"the ledger in {ledger_dir} holds {len(runs)} runs; {runs_held(records)}")


def runs_held(records: list[dict]) -> str:
    """The run ids a ledger holds, newest last (ids only, never a record's values), and how to pass one."""
    runs = ledger_run_ids(records)
    if not runs:
        return "it holds no run yet"
    shown = runs[-MAX_LISTED_RUNS:]
    older = f" ({len(runs) - len(shown)} older not shown)" if len(runs) > len(shown) else ""
    return (f"its runs, newest last{older}: {', '.join(printable(r) for r in shown)}; pass one as --run-id "
            f"RUN_ID (fedtune's run id: run.json of the run directory, and the node's log line "
            f"'fedtune run RUN_ID (Flower run N)')")


def printable(run_id: str) -> str:
    """A run id as text safe on a terminal: the coordinator chose it, and may have put anything in it."""
    text = run_id[:MAX_RUN_ID_CHARS]
    text = text if text.isprintable() and text.strip() == text and text else repr(text)
    return text + ("..." if len(run_id) > MAX_RUN_ID_CHARS else "")


def write_receipt(*, ledger_dir: Path, run_id: str | None, out: Path) -> dict:
    payload = make_receipt(ledger_dir=ledger_dir, run_id=run_id)
    atomic_write(Path(out), json.dumps(payload, indent=2) + "\n")
    return payload


class ReceiptError(FedtuneError):
    """A receipt file that cannot be read as one: named, never a traceback."""


def load_receipt(path: Path) -> tuple[Receipt, bytes]:
    """The receipt and its signature from a file; a one-line error naming the file otherwise."""
    path = Path(path)
    try:
        payload = read_json_file(path)  # bounded: a receipt comes from another party
    except FileNotFoundError:
        raise ReceiptError(f"receipt {path}: file not found") from None
    except TooLarge as exc:
        raise ReceiptError(f"receipt {path}: {exc}, which no receipt is; ask the institution for the file "
                           f"`fedtune receipt` wrote") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise ReceiptError(f"receipt {path}: not JSON; ask the institution for the file `fedtune receipt` "
                           f"wrote") from None
    try:
        if payload.get("format") != FORMAT:
            raise ValueError("format")
        body = payload["receipt"]
        receipt = Receipt(client_id=_text(body["client_id"]), run_id=_text(body["run_id"]),
                          records=_count(body["records"]), head_hash=_text(body["head_hash"]),
                          last_round=_count(body["last_round"]), epsilon=_epsilon(body["epsilon"]),
                          rounds=tuple(_entry(e) for e in body["rounds"]))
        if set(body) != set(Receipt.__dataclass_fields__):
            raise ValueError("fields")
        signature = base64.b64decode(payload["signature"], validate=True)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ReceiptError(f"receipt {path}: not a fedtune receipt ({FORMAT}), or a field is missing or "
                           f"malformed") from None
    return receipt, signature


def receipt_verifies(receipt: Receipt, signature: bytes, key: Ed25519PublicKey) -> bool:
    try:
        key.verify(signature, receipt.statement())
    except (InvalidSignature, ValueError):  # ValueError: a body no ledger key ever signed (not canonical)
        return False
    return True


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError("text")
    return value


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("count")
    return value


def _epsilon(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("epsilon")
    return value  # as signed: a float turned int (or back) would change the signed bytes


def _entry(value) -> tuple[int, int, str, str]:
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError("round entry")
    return _count(value[0]), _count(value[1]), _text(value[2]), _text(value[3])


def receipt_problems(*, path: Path, receipt: Receipt, signature: bytes, owner: str | None,
                     records: list[dict], key: Ed25519PublicKey | None, run_id: str | None) -> list[str]:
    """What the run directory contradicts in one receipt: each problem names the client and round."""
    name = f"receipt {Path(path).name}"
    if owner is None or key is None:
        return [f"{name}: client {receipt.client_id!r} has no ledger in this run"]
    if not receipt_verifies(receipt, signature, key):
        return [f"{name}: not signed by {owner}'s ledger key {public_key_fingerprint(key)} (a forged receipt, "
                f"or the run's key for {owner} was replaced)"]
    if run_id is not None and receipt.run_id != run_id:
        return [f"{name}: for run {receipt.run_id}, but this run is {run_id} (run.json)"]
    problems = []
    for seq, server_round, status, digest in receipt.rounds:
        if seq >= len(records):
            problems.append(f"{owner} round {server_round} ({status}, record {seq + 1}): covered by its receipt, "
                            f"missing from the run's ledger (truncated or rolled back)")
        elif record_hash_or_none(records[seq]) != digest:
            problems.append(f"{owner} round {server_round} ({status}, record {seq + 1}): differs from the record "
                            f"its receipt covers (altered, replaced or re-signed)")
    if len(records) >= receipt.records and record_hash_or_none(records[receipt.records - 1]) != receipt.head_hash:
        problems.append(f"{owner}: its ledger up to record {receipt.records} is not the one it receipted")
    elif len(records) < receipt.records and not problems:
        problems.append(f"{owner}: its ledger holds {len(records)} records, its receipt covers {receipt.records} "
                        f"(records of another run were removed)")
    return problems

