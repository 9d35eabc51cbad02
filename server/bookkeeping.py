"""What the coordinator writes about a round and a run, as pure functions of what happened.

`round_record` is a line of metrics.jsonl, `server_ledger_record` what the coordinator signs
for the round, `run_summary` summary.json. None of them touches a file or Flower, so each is
tested in milliseconds (tests/test_bookkeeping.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.common import ndarray_to_bytes

from fedtune.common.ledger.records import server_record_fields
from fedtune.common.protocol import REFUSALS, Status
from fedtune.common.storage import json_safe
from fedtune.common.tasks.base import Task
from fedtune.server.strategy import RoundOutcome

# A client's entry in a round record: what it reported, in this order (absent ones left out).
CLIENT_ENTRY_FIELDS = ("status", "epsilon", "noise_multiplier", "sample_rate", "steps", "train_loss",
                       "num_examples", "update_max_abs", "lora_a_sha256", "rejected", "resent", "reason")


def client_entries(outcome: RoundOutcome, *, task: Task) -> dict[str, dict[str, Any]]:
    """Per client id: its fit report, example count, rejection (if any) and validation scores."""
    entries = {}
    for cid, reply in sorted(outcome.replies.items()):
        reported = {**reply.report.to_metrics(), "num_examples": reply.num_examples}
        if cid in outcome.rejected:
            reported["rejected"] = outcome.rejected[cid]
        entry = {key: reported[key] for key in CLIENT_ENTRY_FIELDS if key in reported}
        evaluation = outcome.evaluations.get(cid)
        if evaluation is not None:
            entry["val_loss"] = evaluation.loss
            entry.update({f"val_{name}": evaluation.scores[name] for name in task.score_names
                          if name in evaluation.scores})
        entries[cid] = entry
    return entries


def round_record(*, server_round: int, outcome: RoundOutcome, test_scores: dict[str, float], task: Task,
                 seconds: float, bytes_up: int, secure_aggregation: bool) -> dict[str, Any]:
    """A line of metrics.jsonl: the round's test scores, its cost and what each client reported."""
    record = {
        "round": server_round,
        "test_loss": test_scores.get("loss"),
        **{f"test_{name}": test_scores.get(name) for name in (*task.score_names, *task.test_diagnostics)},
        "seconds": round(seconds, 3),
        "bytes_up_per_client": bytes_up,
        "aggregation": "secagg+" if secure_aggregation else "plain",
        "update_applied": outcome.applied,
        "aggregation_failed": outcome.aggregation_failed,
        "clients_sampled": outcome.sampled,
        "clients_trained": len(outcome.trained),
        "failures": outcome.failures,
        "clients": client_entries(outcome, task=task),
    }
    if outcome.secagg_refusals:  # institutions that refused a SecAgg+ stage, and why
        record["secagg_refusals"] = dict(sorted(outcome.secagg_refusals.items()))
    return record


def server_ledger_record(*, run_id: str, record: dict[str, Any], outcome: RoundOutcome, adapter_sha256: str,
                         task: Task) -> dict[str, Any]:
    """What the coordinator signs for the round described by `record` (a round_record)."""
    headline = f"test_{task.headline_metric}"
    return json_safe(server_record_fields(
        run_id=run_id, server_round=record["round"], sampled=record["clients_sampled"],
        reports={cid: reply.report for cid, reply in outcome.replies.items()}, failures=record["failures"],
        aggregation=record["aggregation"], update_applied=record["update_applied"],
        aggregation_failed=record["aggregation_failed"], rejected=outcome.rejected,
        adapter_sha256=adapter_sha256, test_scores={headline: record[headline]} if headline in record else {},
        secagg_refusals=outcome.secagg_refusals,
        early_stopping={key: record[key] for key in record
                        if key.startswith("validation_") or key in ("stopped_early", "early_stopping_patience")}))


def every_client_refused(outcome: RoundOutcome) -> bool:
    """Every sampled client refused (budget spent, or the job asks for less than its policy allows).
    A replay refusal concerns only the round asked again (after a resume): the next round goes on."""
    refused = [cid for cid, reply in outcome.replies.items()
               if reply.report.status in REFUSALS and reply.report.status != Status.REFUSED_REPLAY]
    return bool(outcome.replies) and len(refused) == len(outcome.replies) == outcome.sampled


def run_summary(*, task: Task, config, rounds: list[dict[str, Any]], initial_scores: dict[str, float],
                seconds: float) -> dict[str, Any]:
    """summary.json: the last round's scores, the privacy settings and each client's latest epsilon."""
    last = rounds[-1] if rounds else {}
    epsilon: dict[str, float | None] = {}
    noise: dict[str, float | None] = {}
    for record in rounds:  # the latest report of each client wins
        for cid, entry in record["clients"].items():
            if "epsilon" in entry:
                epsilon[cid] = entry["epsilon"]
            if "noise_multiplier" in entry:
                noise[cid] = entry["noise_multiplier"]
    return {
        "task": task.name,
        "rounds_completed": len(rounds),
        **task.summary_scores(last=last, initial=initial_scores),
        "dp": config.dp,
        "secure_aggregation": config.secure_aggregation,
        "target_epsilon": config.target_epsilon if config.dp else None,
        "target_delta": config.target_delta if config.dp else None,
        "epsilon": dict(sorted(epsilon.items())),
        "noise_multiplier": dict(sorted(noise.items())),
        "seconds": round(seconds, 2),
        **({"stopped_early": {"after_round": last["round"], "reason": last["stopped_early"]}}
           if "stopped_early" in last else {}),
    }


def upload_bytes(arrays: list[np.ndarray], *, secure: bool) -> int:
    """Bytes of the adapter update one client uploads, as Flower serializes it.

    SecAgg+ sends int64 masked fixed-point values plus one array for the weight factor.
    """
    if secure:
        shapes = [(1,)] + [a.shape for a in arrays]
        return sum(len(ndarray_to_bytes(np.zeros(s, dtype=np.int64))) for s in shapes)
    return sum(len(ndarray_to_bytes(a.astype(np.float32))) for a in arrays)
