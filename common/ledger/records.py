"""What a ledger record says: the client's record of a round and the coordinator's.

A client signs one record per round it is asked to train (trained or refused); its accountant
history and its noise plan for a run are read back from those records, so a restarted client
continues its epsilon instead of starting again from zero. The coordinator signs one record
per round: who was asked, who trained, and each client's epsilon and ledger head as reported,
which the audit compares with what each client signed.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from fedtune.common.privacy.accounting import HistoryEntry, compose
from fedtune.common.protocol import REFUSALS, FitReport, Status

if TYPE_CHECKING:  # the plan module loads opacus (and torch): `fedtune audit` never needs it
    from fedtune.common.privacy.plan import PrivacyPlan

CLIENT_KIND = "client"
SERVER_KIND = "server"
ADAPTER_SAVED = "adapter-saved"  # the server's last record of a finished run: the adapter/ files it wrote


NO_DP_ENTRY_SIGMA = 0.0  # a round trained without noise: its history entry makes epsilon infinite
FIT_STATUSES = (Status.TRAINED, Status.REFUSED_BUDGET)  # records a resumed round is answered from


def client_record_fields(*, client_id: str, run_id: str, server_round: int, status: Status,
                         plan: PrivacyPlan | None, steps: int, epsilon: float | None,
                         local_examples: int, policy: dict[str, Any] | None = None,
                         reason: str | None = None, request: str = "fit",
                         profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a client signs for a round (built before signing: the update cache keeps a copy).

    `policy` is the node policy in force (NodePolicy.to_record); `reason` why it refused;
    `profile` the execution profile that trained it (performance only: device, dtype, threads)."""
    fields: dict[str, Any] = {
        "kind": CLIENT_KIND, "client_id": client_id, "run_id": run_id, "round": server_round,
        "status": str(status), "dp": plan is not None, "steps": steps, "local_examples": local_examples,
        "num_examples": local_examples if status in (Status.TRAINED, Status.EVALUATED) else 0,
        "time": round(time.time(), 3),
    }
    if request != "fit":
        fields["request"] = request
    if policy is not None:
        fields["policy"] = dict(policy)
    if reason is not None:
        fields["reason"] = reason
    if profile is not None:
        fields["profile"] = dict(profile)
    if plan is not None:
        stages = plan.stages_record()  # a two-stage plan: both stages, so it reads back whole
        if stages is not None:
            fields["stages"] = stages
        plan = plan.for_round(server_round)  # the fields the audit recomputes are this round's stage's
        fields.update(sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
                      steps_per_round=plan.steps_per_round, planned_rounds=plan.planned_rounds,
                      accountant=plan.accountant, delta=plan.target_delta,
                      target_epsilon=plan.target_epsilon, epsilon=epsilon,
                      budget_remaining=plan.target_epsilon - epsilon
                      if epsilon is not None and math.isfinite(epsilon) else None)
    return fields


def trained_history(records: list[dict[str, Any]]) -> list[HistoryEntry]:
    """(sigma, q, steps) of every round a client trained, in order, merged. A round trained
    without DP enters as sigma 0: not free, but infinite epsilon from then on."""
    history: list[HistoryEntry] = []
    for record in records:
        if record["status"] != Status.TRAINED:
            continue
        if record["dp"]:
            history = compose(history, (record["noise_multiplier"], record["sample_rate"], record["steps"]))
        else:
            history = compose(history, (NO_DP_ENTRY_SIGMA, 1.0, max(1, int(record["steps"]))))
    return history


def evaluations_answered(records: list[dict[str, Any]]) -> int:
    """How many evaluation requests a client answered over its whole ledger."""
    return sum(1 for record in records if record["status"] == Status.EVALUATED)


def plan_of_run(records: list[dict[str, Any]], run_id: str) -> PrivacyPlan | None:
    """The noise plan a client fixed for `run_id` in its first round of it (never recalibrated)."""
    from fedtune.common.privacy.plan import PrivacyPlan, ProbeStage

    for record in reversed(records):
        if record["run_id"] == run_id and record["dp"] and record["status"] in FIT_STATUSES:
            stages = record.get("stages")
            adapter = stages["adapter"] if stages else record
            return PrivacyPlan(num_examples=record["local_examples"], sample_rate=adapter["sample_rate"],
                               steps_per_round=adapter["steps_per_round"],
                               noise_multiplier=adapter["noise_multiplier"],
                               planned_rounds=record["planned_rounds"],
                               target_epsilon=record["target_epsilon"], target_delta=record["delta"],
                               accountant=record["accountant"],
                               probe=ProbeStage(**stages["probe"]) if stages else None)
    return None


def record_of_round(records: list[dict[str, Any]], run_id: str, server_round: int) -> dict[str, Any] | None:
    """The record a client signed for training a round of a run (trained or refused for budget)."""
    for record in reversed(records):
        if record["run_id"] == run_id and record["round"] == server_round and record["status"] in FIT_STATUSES:
            return record
    return None


def server_record_fields(*, run_id: str, server_round: int, sampled: int, reports: dict[str, FitReport],
                         failures: int, aggregation: str, update_applied: bool, aggregation_failed: str | None,
                         rejected: dict[str, str], adapter_sha256: str, test_scores: dict[str, Any],
                         secagg_refusals: dict[str, str] | None = None,
                         early_stopping: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the coordinator signs for a round: who was asked, who trained, what each reported, and
    (with early stopping) its validation score and, in the last round, why the run stopped."""
    ordered = dict(sorted(reports.items()))
    return {
        "kind": SERVER_KIND, "run_id": run_id, "round": server_round,
        "sampled": sampled, "replied": list(ordered),
        "trained": [cid for cid, r in ordered.items() if r.status == Status.TRAINED],
        "refused": [cid for cid, r in ordered.items() if r.status in REFUSALS],
        "refusal_reasons": {cid: r.reason for cid, r in ordered.items() if r.reason},
        "failures": failures,
        "epsilon": {cid: r.epsilon for cid, r in ordered.items()},
        "client_ledger_heads": {cid: r.ledger_head for cid, r in ordered.items()},
        "aggregation": aggregation, "update_applied": update_applied,
        "aggregation_failed": aggregation_failed,
        "rejected": {cid: why for cid, why in sorted(rejected.items()) if cid in ordered},
        "adapter_sha256": adapter_sha256,
        **test_scores,
        **({"secagg_refusals": dict(sorted(secagg_refusals.items()))} if secagg_refusals else {}),
        **(early_stopping or {}),
    }


def adapter_saved_fields(*, run_id: str, server_round: int, adapter_sha256: str,
                         files: dict[str, str]) -> dict[str, Any]:
    """What the coordinator signs after writing the final adapter: the arrays' fingerprint (the
    last round record's `adapter_sha256`) and each file's SHA-256, so a replaced adapter/ shows."""
    return {"kind": SERVER_KIND, "event": ADAPTER_SAVED, "run_id": run_id, "round": server_round,
            "adapter_sha256": adapter_sha256, "files": dict(sorted(files.items()))}


def is_round_record(record: dict[str, Any]) -> bool:
    """A server record of a round (not an event such as the saved adapter)."""
    return "event" not in record
