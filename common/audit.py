"""Audit a finished run from its ledgers alone, without trusting the operator.

Checks, in order: every ledger's hash chain and Ed25519 signatures (under pinned keys when
given); each client's claimed epsilon against a recomputation from its own recorded history
with an independent accountant (Google's dp_accounting PLD, not Opacus); the server's
record of each client's epsilon and ledger head against what that client signed; and budgets.
Exit codes: 0 clean, 1 a verification failed, 2 a budget was exceeded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.errors import FedtuneError
from common.ledger import (LEDGER_FILE, PUBLIC_KEY_FILE, load_public_key, public_key_fingerprint, read_records,
                           record_hash, verify_records)

UNDER_REPORT_TOLERANCE = 0.01  # a claim more than 1% below the recomputation is flagged
BUDGET_TOLERANCE = 0.01  # accountants differ slightly; a recomputation >1% above budget is a breach


@dataclass
class LedgerCheck:
    owner: str
    path: str
    records: int
    key_fingerprint: str
    key_pinned: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class ClientRow:
    client_id: str
    run_id: str
    round: int
    status: str
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    claimed_epsilon: float | None
    recomputed_epsilon: float | None
    target_epsilon: float | None
    flags: list[str] = field(default_factory=list)


@dataclass
class AuditResult:
    ledgers: list[LedgerCheck]
    rows: list[ClientRow]
    problems: list[str]
    budget_exceeded: list[str]
    notes: list[str]

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 2 if self.budget_exceeded else 0

    @property
    def verdict(self) -> str:
        return {0: "clean", 1: "verification failed", 2: "budget exceeded"}[self.exit_code]

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "exit_code": self.exit_code, **asdict(self)}


def find_ledgers(target: Path) -> dict[str, Path]:
    """Owner name -> ledger file, for a run directory, a ledger directory or a ledger file."""
    target = Path(target)
    if target.is_file() and target.name == LEDGER_FILE:
        return {target.parent.name: target}
    if (target / LEDGER_FILE).is_file():
        return {target.name: target / LEDGER_FILE}
    root = target / "ledgers"
    found = {d.name: d / LEDGER_FILE for d in sorted(root.iterdir()) if (d / LEDGER_FILE).is_file()} \
        if root.is_dir() else {}
    if not found:
        raise FedtuneError(f"{target} is not a fedtune run directory or ledger (no ledgers/*/{LEDGER_FILE} "
                           f"and no {LEDGER_FILE} inside)")
    return found


def independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a Poisson-subsampled Gaussian history by dp_accounting's PLD accountant."""
    from dp_accounting import dp_event, pld

    if not history:
        return 0.0
    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
              for s, q, n in history]
    accountant = pld.PLDAccountant()
    accountant.compose(dp_event.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def audit_run(*, target: Path, pinned_keys: dict[str, Path] | None = None) -> AuditResult:
    pinned_keys = dict(pinned_keys or {})
    ledgers = find_ledgers(target)
    unknown = sorted(set(pinned_keys) - set(ledgers))
    if unknown:
        raise FedtuneError(f"--public-key names {', '.join(unknown)}, but the ledgers here are "
                           f"{', '.join(ledgers)}")
    result = AuditResult(ledgers=[], rows=[], problems=[], budget_exceeded=[], notes=[])
    records_by_owner: dict[str, list[dict]] = {}
    for owner, path in ledgers.items():
        key_path = pinned_keys.get(owner, path.parent / PUBLIC_KEY_FILE)
        key = load_public_key(key_path)
        check = verify_records(path, read_records(path), key)
        result.ledgers.append(LedgerCheck(owner=owner, path=str(path), records=len(check.records),
                                          key_fingerprint=public_key_fingerprint(key),
                                          key_pinned=owner in pinned_keys, problems=list(check.problems)))
        result.problems.extend(check.problems)
        records_by_owner[owner] = check.records
    unpinned = [c.owner for c in result.ledgers if not c.key_pinned]
    if unpinned:
        result.notes.append(f"keys read from beside the ledgers for {', '.join(unpinned)}; pin them with "
                            f"--public-key NAME=FILE to rule out a re-signed ledger")
    server = records_by_owner.pop("server", None)
    for owner, records in records_by_owner.items():
        _audit_client(owner, records, result)
    if server is not None:
        _cross_check(server, records_by_owner, result)
    return result


def _audit_client(owner: str, records: list[dict], result: AuditResult) -> None:
    history: list[tuple[float, float, int]] = []
    for index, record in enumerate(records):
        name = f"{owner} record {index + 1} (round {record.get('round', '?')})"
        try:
            dp, status = bool(record["dp"]), str(record["status"])
            if dp and status == "trained":
                history.append((float(record["noise_multiplier"]), float(record["sample_rate"]),
                                int(record["steps"])))
            claimed = record.get("epsilon") if dp else None
            recomputed = independent_epsilon(history, float(record["delta"])) if dp else None
        except (KeyError, TypeError, ValueError) as exc:
            result.problems.append(f"{name}: malformed record ({exc})")
            continue
        row = ClientRow(client_id=str(record.get("client_id", owner)), run_id=str(record.get("run_id")),
                        round=int(record.get("round", -1)), status=status, steps=int(record.get("steps", 0)),
                        noise_multiplier=record.get("noise_multiplier"), sample_rate=record.get("sample_rate"),
                        claimed_epsilon=claimed, recomputed_epsilon=recomputed,
                        target_epsilon=record.get("target_epsilon"))
        if dp:
            if claimed is None or not math.isfinite(claimed) or claimed < recomputed * (1 - UNDER_REPORT_TOLERANCE):
                row.flags.append("under-reported")
                result.problems.append(f"{name}: claims epsilon {claimed} but its recorded history gives "
                                       f"{recomputed:.4f} (independent PLD accountant)")
            budget = row.target_epsilon
            if budget is not None and (
                    (claimed is not None and claimed > budget * (1 + 1e-9))
                    or recomputed > budget * (1 + BUDGET_TOLERANCE)):
                row.flags.append("over budget")
                result.budget_exceeded.append(f"{name}: epsilon {max(claimed or 0, recomputed):.4f} exceeds "
                                              f"the budget {budget}")
        result.rows.append(row)


def _cross_check(server: list[dict], clients: dict[str, list[dict]], result: AuditResult) -> None:
    """The epsilon and ledger head the server recorded must be exactly what the client signed."""
    signed = {}
    for owner, records in clients.items():
        for record in records:
            signed[(str(record.get("client_id", owner)), str(record.get("run_id")), record.get("round"))] = record
    for index, entry in enumerate(server):
        name = f"server record {index + 1} (round {entry.get('round', '?')})"
        for cid, epsilon in (entry.get("epsilon") or {}).items():
            own = signed.get((cid, str(entry.get("run_id")), entry.get("round")))
            if own is None:
                result.problems.append(f"{name}: lists {cid}, but {cid}'s ledger has no record for that round")
                continue
            if own.get("epsilon") != epsilon:
                result.problems.append(f"{name}: records epsilon {epsilon} for {cid}, which signed "
                                       f"{own.get('epsilon')}")
            head = (entry.get("client_ledger_heads") or {}).get(cid)
            if head is not None and head != record_hash(own):
                result.problems.append(f"{name}: {cid}'s ledger head differs from the record {cid} holds")
