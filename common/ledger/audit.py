"""Audit a finished run from its ledgers alone, without trusting the operator.

Checks, in order: every ledger's hash chain and Ed25519 signatures (under pinned keys when
given); each client's claimed epsilon against a recomputation from its own recorded history
with an independent accountant (Google's dp_accounting PLD, not Opacus; at a discretization
ten times coarser than its default, and again at the default before anything is flagged); the server's
record of each client's epsilon and ledger head against what that client signed; and budgets.
Each record is also checked against the node policy signed into it (common/ledger/policy_audit.py).
The recomputation is bounded in time and memory (common/ledger/recompute.py): a history past its
bounds is a check not made, a problem, never a pass.
Exit codes: 0 clean, 1 a verification failed, 2 a budget was exceeded or a recorded policy breached.
Exit 0 reads "clean" only when every client ledger verifies under a key the auditor pinned whose
private half is not in the directory; otherwise "consistent (...)", saying why (common/ledger/trust.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.audit_result import AuditResult, ClientRow, LedgerCheck
from fedtune.common.ledger.chain import (LEDGER_FILE, PUBLIC_KEY_FILE, load_public_key, public_key_fingerprint,
                                 read_records, record_hash_or_none, verify_records)
from fedtune.common.ledger.policy_audit import policy_findings
from fedtune.common.ledger.receipts import load_receipt, receipt_problems
from fedtune.common.ledger.recompute import ClientRecomputation
from fedtune.common.ledger.recompute import TooLarge as RecomputationTooLarge
from fedtune.common.ledger.records import NO_DP_ENTRY_SIGMA, SERVER_KIND, is_round_record
from fedtune.common.ledger.run_checks import run_findings, run_id_of
from fedtune.common.ledger.trust import private_key_fingerprints, trust_statement
from fedtune.common.privacy.accounting import HistoryEntry
from fedtune.common.protocol import Status

RECORD_STATUSES = (Status.TRAINED, Status.REFUSED_BUDGET, Status.REFUSED_POLICY, Status.EVALUATED,
                   Status.REFUSED_REPLAY, Status.REFUSED_SECURE_AGGREGATION)
UNDER_REPORT_TOLERANCE = 0.01  # a claim more than 1% below the recomputation is flagged
BUDGET_TOLERANCE = 0.01  # accountants differ slightly; a recomputation >1% above budget is a breach


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


def audit_run(*, target: Path, pinned_keys: dict[str, Path] | None = None,
              receipts: list[Path] | None = None, progress: Callable[[str], None] | None = None) -> AuditResult:
    """Audit `target`; with `pinned_keys` (owner -> public key file) and `receipts` (files the
    institutions signed), against what the operator could not have written. `progress` hears
    what is being checked (a spinner's text)."""
    progress = progress or (lambda _: None)
    pinned_keys = dict(pinned_keys or {})
    ledgers = find_ledgers(target)
    unknown = sorted(set(pinned_keys) - set(ledgers))
    if unknown:
        raise FedtuneError(f"--public-key names {', '.join(unknown)}, but the ledgers here are "
                           f"{', '.join(ledgers)}")
    loaded = [(Path(path), *load_receipt(Path(path))) for path in receipts or []]  # a bad file stops here
    result = AuditResult(ledgers=[], rows=[], problems=[], budget_exceeded=[], notes=[])
    records_by_owner: dict[str, list[dict]] = {}
    keys = {}
    inside = private_key_fingerprints(Path(target))
    for owner, path in ledgers.items():
        progress(f"verifying the signatures of {owner}'s ledger")
        key_path = pinned_keys.get(owner, path.parent / PUBLIC_KEY_FILE)
        keys[owner] = key = load_public_key(key_path)
        check = verify_records(path, read_records(path), key)
        result.ledgers.append(LedgerCheck(owner=owner, path=str(path), records=len(check.records),
                                          key_fingerprint=public_key_fingerprint(key),
                                          key_pinned=owner in pinned_keys, problems=list(check.problems),
                                          private_key_inside=public_key_fingerprint(key) in inside))
        result.problems.extend(check.problems)
        records_by_owner[owner] = check.records
    run_dir = Path(target) if (Path(target) / "ledgers").is_dir() else None
    _check_receipts(loaded, records_by_owner, keys, run_id_of(run_dir) if run_dir else None, result)
    server = records_by_owner.pop("server", None)
    for owner, records in records_by_owner.items():
        progress(f"recomputing {owner}'s epsilon with the PLD accountant")
        _audit_client(owner, records, result)
        breaches, notes = policy_findings(owner, records)
        result.policy_breaches.extend(breaches)
        result.notes.extend(notes)
    if server is not None and any(r.get("kind") != SERVER_KIND or not isinstance(r.get("epsilon", {}), dict)
                                  for r in server):
        result.problems.append("ledgers/server holds records that are not the coordinator's round records: "
                               "the run's cross-checks were not made")
    elif server is not None:
        _cross_check([r for r in server if is_round_record(r)], records_by_owner, result)
        if run_dir is not None:
            problems, notes = run_findings(run_dir, server, records_by_owner)
            result.problems.extend(problems)
            result.notes.extend(notes)
    elif run_dir is not None:
        result.problems.append(f"{run_dir} has client ledgers but no server ledger (ledgers/server/{LEDGER_FILE})")
    result.trust = trust_statement(result.ledgers, ledgers)
    return result


def _check_receipts(loaded: list, records_by_owner: dict[str, list[dict]], keys: dict, run_id: str | None,
                    result: AuditResult) -> None:
    for path, receipt, signature in loaded:
        # by the ledger's directory name only, never the server's: a receipt vouches for one client's ledger
        owner = receipt.client_id if receipt.client_id in records_by_owner and receipt.client_id != "server" \
            else None
        problems = receipt_problems(path=path, receipt=receipt, signature=signature, owner=owner,
                                    records=records_by_owner.get(owner, []), key=keys.get(owner), run_id=run_id)
        result.problems.extend(problems)
        for check in result.ledgers:
            if check.owner == owner and not problems:  # the institution's word only under a key it gave
                check.receipted = check.receipted or check.attested
                check.receipt_unattested = check.receipt_unattested or not check.attested


def _number(record: dict, key: str, kind: type = float, *, optional: bool = False):
    """A field of the expected numeric type (never a bool or a string), or ValueError naming it."""
    value = record.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"field '{key}' is {value!r}, not a {kind.__name__}")
    return kind(value)


def _client_row(owner: str, record: dict, history: list[HistoryEntry]) -> ClientRow:
    """The record as a row, its trained round appended to `history`; epsilon is recomputed by the caller."""
    dp, status = record.get("dp"), record.get("status")
    if not isinstance(dp, bool) or status not in RECORD_STATUSES:
        raise ValueError(f"dp={dp!r}, status={status!r}")
    if status == Status.TRAINED:  # a round without DP is not free: sigma 0 makes epsilon infinite
        history.append((_number(record, "noise_multiplier"), _number(record, "sample_rate"),
                        _number(record, "steps", int)) if dp
                       else (NO_DP_ENTRY_SIGMA, 1.0, max(1, _number(record, "steps", int))))
    return ClientRow(
        client_id=str(record.get("client_id", owner)), run_id=str(record.get("run_id")),
        round=_number(record, "round", int), status=status, steps=_number(record, "steps", int),
        noise_multiplier=_number(record, "noise_multiplier", optional=not dp),
        sample_rate=_number(record, "sample_rate", optional=not dp),
        claimed_epsilon=_number(record, "epsilon", optional=True) if dp else None,
        recomputed_epsilon=None if dp else math.inf if status == Status.TRAINED else None,
        target_epsilon=_number(record, "target_epsilon", optional=not dp),
        delta=_number(record, "delta") if dp else None)


def _audit_client(owner: str, records: list[dict], result: AuditResult) -> None:
    """Each record's claim against the recomputation (common/ledger/recompute.py: composed record by
    record, in bounded time and memory); past those bounds a check not made is a problem, never a pass."""
    history: list[HistoryEntry] = []
    recomputation = ClientRecomputation()
    beyond: str | None = None  # why this client's history is no longer recomputed
    for index, record in enumerate(records):
        name = f"{owner} record {index + 1} (round {record.get('round', '?')})"
        try:
            row = _client_row(owner, record, history)
        except ValueError as exc:
            result.problems.append(f"{name}: malformed record ({exc})")
            continue
        dp, budget = record["dp"], row.target_epsilon
        if dp and beyond is None:
            try:
                row.recomputed_epsilon = recomputation.quick_epsilon(history, row.delta)
            except RecomputationTooLarge as exc:
                beyond = str(exc)
                result.problems.append(f"{name}: not recomputed: its history holds {beyond}, past what the audit "
                                       f"recomputes (common/ledger/recompute.py); this client's epsilon from here "
                                       f"on was not checked")
        if dp and row.recomputed_epsilon is None:
            row.flags.append("not recomputed")
            if _claim_over(row, budget):
                row.flags.append("over budget")
                result.budget_exceeded.append(f"{name}: claimed epsilon {row.claimed_epsilon} exceeds the "
                                              f"budget {budget}")
            result.rows.append(row)
            continue
        confirmed = True
        if dp and (_under_reported(row.claimed_epsilon, row.recomputed_epsilon) or _over(row, budget)):
            # the quick value is an upper bound: confirm at dp_accounting's own precision before flagging
            try:
                row.recomputed_epsilon = recomputation.precise_epsilon(history, row.delta)
            except RecomputationTooLarge:
                confirmed = False  # the quick value stands (pessimistic, within 0.7% of the precise one)
        if dp:
            _flag(name, row, budget, result, confirmed=confirmed)
        result.rows.append(row)


def _flag(name: str, row: ClientRow, budget: float | None, result: AuditResult, *, confirmed: bool) -> None:
    claimed, recomputed = row.claimed_epsilon, row.recomputed_epsilon
    how = "" if confirmed else " (at the quick discretization: the precise one is past the audit's bound)"
    if _under_reported(claimed, recomputed):
        row.flags.append("under-reported")
        result.problems.append(f"{name}: claims epsilon {claimed} but its recorded history gives "
                               f"{recomputed:.4f} (independent PLD accountant){how}")
    if _over(row, budget):
        row.flags.append("over budget")
        result.budget_exceeded.append(f"{name}: epsilon {max(claimed or 0, recomputed):.4f} exceeds "
                                      f"the budget {budget}{how}")


def _claim_over(row: ClientRow, budget: float | None) -> bool:
    return budget is not None and row.claimed_epsilon is not None and row.claimed_epsilon > budget * (1 + 1e-9)


def _over(row: ClientRow, budget: float | None) -> bool:
    claimed = row.claimed_epsilon
    return budget is not None and ((claimed is not None and claimed > budget * (1 + 1e-9))
                                   or row.recomputed_epsilon > budget * (1 + BUDGET_TOLERANCE))


def _under_reported(claimed: float | None, recomputed: float) -> bool:
    """A claim more than 1% below the recomputation; after a round without DP (infinite), any
    finite claim (a client honest about it records none)."""
    if math.isinf(recomputed):
        return claimed is not None
    return claimed is None or not math.isfinite(claimed) or claimed < recomputed * (1 - UNDER_REPORT_TOLERANCE)


def _cross_check(server: list[dict], clients: dict[str, list[dict]], result: AuditResult) -> None:
    """The epsilon and ledger head the server recorded must be exactly what the client signed;
    rounds a client signed that the server never recorded are noted (its spend still counts)."""
    signed = {}
    for owner, records in clients.items():
        for record in records:
            if record.get("request") == "evaluate":  # an evaluation of that round: the server lists the training
                continue
            signed[(str(record.get("client_id", owner)), str(record.get("run_id")), record.get("round"))] = record
    listed = {(cid, str(entry.get("run_id")), entry.get("round"))
              for entry in server for cid in (entry.get("epsilon") or {})}
    server_runs = {str(entry.get("run_id")) for entry in server}
    for key in sorted(set(signed) - listed, key=str):
        if key[1] in server_runs:  # a client can drop after training: its spend counts, the server never heard
            result.notes.append(f"{key[0]} signed a record for round {key[2]} that the server ledger does not "
                                f"list (the client's reply did not arrive, or server records were removed)")
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
            if head is not None and head != record_hash_or_none(own):
                result.problems.append(f"{name}: {cid}'s ledger head differs from the record {cid} holds")

