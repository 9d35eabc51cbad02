"""A client's privacy record: its signed ledger is the one source of truth for what it spent.

Every round the client is asked to train leaves one record (trained or refused). The
accountant history is rebuilt from the ledger's trained records, so a client restarted with the
same ledger directory continues its epsilon instead of starting again from zero; the noise plan
of a run is read back from that run's records and never recalibrated.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.common.ledger.chain import Ledger
from fedtune.common.ledger.records import (client_record_fields, evaluations_answered, plan_of_run, record_of_round,
                                   trained_history)
from fedtune.common.privacy.accounting import HistoryEntry
from fedtune.common.privacy.plan import PrivacyPlan
from fedtune.common.protocol import Status


class ClientPrivacyLedger:
    def __init__(self, *, directory: Path, client_id: str) -> None:
        self.ledger = Ledger(directory)  # verifies chain and signatures, or raises LedgerError
        self.client_id = client_id

    def history(self) -> list[HistoryEntry]:
        """(sigma, q, steps) of every DP round this client trained, in order, merged."""
        return trained_history(self.ledger.records)

    def plan_for(self, run_id: str) -> PrivacyPlan | None:
        return plan_of_run(self.ledger.records, run_id)

    def record_for(self, run_id: str, server_round: int) -> dict | None:
        """The record this client signed for a round of a run, if it was asked before."""
        return record_of_round(self.ledger.records, run_id, server_round)

    def evaluations_answered(self) -> int:
        return evaluations_answered(self.ledger.records)

    def record(self, **fields) -> dict:
        """Sign a record now (a refusal or an evaluation: nothing is cached for it)."""
        return self.append(self.fields(**fields))

    def append(self, fields: dict) -> dict:
        return self.ledger.append(fields)  # verified, signed, fsynced

    def fields(self, *, run_id: str, server_round: int, status: Status, plan: PrivacyPlan | None,
               steps: int, epsilon: float | None, local_examples: int, policy: dict | None = None,
               reason: str | None = None, request: str = "fit", profile: dict | None = None) -> dict:
        """What the client signs for a round (before signing: the update cache keeps a copy)."""
        return client_record_fields(client_id=self.client_id, run_id=run_id, server_round=server_round,
                                    status=status, plan=plan, steps=steps, epsilon=epsilon,
                                    local_examples=local_examples, policy=policy, reason=reason,
                                    request=request, profile=profile)

    @property
    def head_hash(self) -> str:
        return self.ledger.head_hash
