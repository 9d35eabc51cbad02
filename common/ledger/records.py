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
from typing import Any

from common.privacy.accounting import HistoryEntry, compose
from common.privacy.plan import PrivacyPlan
from common.protocol import FitReport, Status

CLIENT_KIND = "client"
SERVER_KIND = "server"


def client_record_fields(*, client_id: str, run_id: str, server_round: int, status: Status,
                         plan: PrivacyPlan | None, steps: int, epsilon: float | None,
                         local_examples: int) -> dict[str, Any]:
    """What a client signs for a round (built before signing: the update cache keeps a copy)."""
    fields: dict[str, Any] = {
        "kind": CLIENT_KIND, "client_id": client_id, "run_id": run_id, "round": server_round,
        "status": str(status), "dp": plan is not None, "steps": steps, "local_examples": local_examples,
        "num_examples": local_examples if status == Status.TRAINED else 0, "time": round(time.time(), 3),
    }
    if plan is not None:
        fields.update(sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
                      steps_per_round=plan.steps_per_round, planned_rounds=plan.planned_rounds,
                      accountant=plan.accountant, delta=plan.target_delta,
                      target_epsilon=plan.target_epsilon, epsilon=epsilon,
                      budget_remaining=plan.target_epsilon - epsilon
                      if epsilon is not None and math.isfinite(epsilon) else None)
    return fields


def trained_history(records: list[dict[str, Any]]) -> list[HistoryEntry]:
    """(sigma, q, steps) of every DP round a client trained, in order, merged."""
    history: list[HistoryEntry] = []
    for record in records:
        if record["status"] == Status.TRAINED and record["dp"]:
            history = compose(history, (record["noise_multiplier"], record["sample_rate"], record["steps"]))
    return history


def plan_of_run(records: list[dict[str, Any]], run_id: str) -> PrivacyPlan | None:
    """The noise plan a client fixed for `run_id` in its first round of it (never recalibrated)."""
    for record in reversed(records):
        if record["run_id"] == run_id and record["dp"]:
            return PrivacyPlan(num_examples=record["local_examples"], sample_rate=record["sample_rate"],
                               steps_per_round=record["steps_per_round"],
                               noise_multiplier=record["noise_multiplier"],
                               planned_rounds=record["planned_rounds"],
                               target_epsilon=record["target_epsilon"], target_delta=record["delta"],
                               accountant=record["accountant"])
    return None


def record_of_round(records: list[dict[str, Any]], run_id: str, server_round: int) -> dict[str, Any] | None:
    """The record a client signed for a round of a run, if it was asked before."""
    for record in reversed(records):
        if record["run_id"] == run_id and record["round"] == server_round:
            return record
    return None


def server_record_fields(*, run_id: str, server_round: int, sampled: int, reports: dict[str, FitReport],
                         failures: int, aggregation: str, update_applied: bool, aggregation_failed: str | None,
                         rejected: dict[str, str], adapter_sha256: str,
                         test_scores: dict[str, Any]) -> dict[str, Any]:
    """What the coordinator signs for a round: who was asked, who trained, what each reported."""
    ordered = dict(sorted(reports.items()))
    return {
        "kind": SERVER_KIND, "run_id": run_id, "round": server_round,
        "sampled": sampled, "replied": list(ordered),
        "trained": [cid for cid, r in ordered.items() if r.status == Status.TRAINED],
        "refused": [cid for cid, r in ordered.items() if r.status == Status.REFUSED_BUDGET],
        "failures": failures,
        "epsilon": {cid: r.epsilon for cid, r in ordered.items()},
        "client_ledger_heads": {cid: r.ledger_head for cid, r in ordered.items()},
        "aggregation": aggregation, "update_applied": update_applied,
        "aggregation_failed": aggregation_failed,
        "rejected": {cid: why for cid, why in sorted(rejected.items()) if cid in ordered},
        "adapter_sha256": adapter_sha256,
        **test_scores,
    }
