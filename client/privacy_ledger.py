"""A client's privacy record: its signed ledger is the one source of truth for what it spent.

Every round the client is asked to train leaves one record (trained or refused). The
accountant history is rebuilt from the ledger's trained records, so a client restarted with the
same ledger directory continues its epsilon instead of starting again from zero; the noise plan
of a run is read back from that run's records and never recalibrated.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from common.ledger import Ledger
from common.privacy import HistoryEntry, PrivacyPlan, compose

TRAINED = "trained"
REFUSED_BUDGET = "refused-budget"


class ClientPrivacyLedger:
    def __init__(self, *, directory: Path, client_id: str) -> None:
        self.ledger = Ledger(directory)  # verifies chain and signatures, or raises LedgerError
        self.client_id = client_id

    def history(self) -> list[HistoryEntry]:
        """(sigma, q, steps) of every DP round this client trained, in order, merged."""
        history: list[HistoryEntry] = []
        for record in self.ledger.records:
            if record["status"] == TRAINED and record["dp"]:
                history = compose(history, (record["noise_multiplier"], record["sample_rate"], record["steps"]))
        return history

    def plan_for(self, run_id: str) -> PrivacyPlan | None:
        for record in reversed(self.ledger.records):
            if record["run_id"] == run_id and record["dp"]:
                return PrivacyPlan(num_examples=record["local_examples"], sample_rate=record["sample_rate"],
                                   steps_per_round=record["steps_per_round"],
                                   noise_multiplier=record["noise_multiplier"],
                                   planned_rounds=record["planned_rounds"],
                                   target_epsilon=record["target_epsilon"], target_delta=record["delta"],
                                   accountant=record["accountant"])
        return None

    def record_for(self, run_id: str, server_round: int) -> dict | None:
        """The record this client signed for a round of a run, if it was asked before."""
        for record in reversed(self.ledger.records):
            if record["run_id"] == run_id and record["round"] == server_round:
                return record
        return None

    def record(self, *, run_id: str, server_round: int, status: str, plan: PrivacyPlan | None,
               steps: int, epsilon: float | None, local_examples: int) -> dict:
        return self.append(self.fields(run_id=run_id, server_round=server_round, status=status, plan=plan,
                                       steps=steps, epsilon=epsilon, local_examples=local_examples))

    def append(self, fields: dict) -> dict:
        return self.ledger.append(fields)  # verified, signed, fsynced

    def fields(self, *, run_id: str, server_round: int, status: str, plan: PrivacyPlan | None,
               steps: int, epsilon: float | None, local_examples: int) -> dict:
        """What the client signs for a round (before signing: the update cache keeps a copy)."""
        fields = {
            "kind": "client", "client_id": self.client_id, "run_id": run_id, "round": server_round,
            "status": status, "dp": plan is not None, "steps": steps, "local_examples": local_examples,
            "num_examples": local_examples if status == TRAINED else 0, "time": round(time.time(), 3),
        }
        if plan is not None:
            fields.update(sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
                          steps_per_round=plan.steps_per_round, planned_rounds=plan.planned_rounds,
                          accountant=plan.accountant, delta=plan.target_delta,
                          target_epsilon=plan.target_epsilon, epsilon=epsilon,
                          budget_remaining=plan.target_epsilon - epsilon
                          if epsilon is not None and math.isfinite(epsilon) else None)
        return fields

    @property
    def head_hash(self) -> str:
        return self.ledger.head_hash
