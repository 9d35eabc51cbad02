"""After each round: checkpoint, metrics.jsonl, the server ledger record, progress, in that order.

The checkpoint comes first: a crash after it loses nothing (a resume completes the outputs from
it); a crash before it redoes the round. The server's ledger record is written here, by
`RoundRecorder.after_round`, from `server.bookkeeping.server_ledger_record`.
"""

from __future__ import annotations

import logging
from typing import Callable

from fedtune.common.ledger.chain import Ledger
from fedtune.common.models.adapter import adapter_sha256
from fedtune.common.storage import json_safe
from fedtune.common.tasks.base import Task
from fedtune.server.bookkeeping import every_client_refused, round_record, server_ledger_record
from fedtune.server.checkpoint import Checkpoint, random_state
from fedtune.server.early_stopping import EarlyStopping
from fedtune.server.run_directory import RunDirectory
from fedtune.server.strategy import AdapterFedAvg, RoundOutcome

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict], None]


class RoundRecorder:
    def __init__(self, *, task: Task, run_id: str, run_dir: RunDirectory, ledger: Ledger, strategy: AdapterFedAvg,
                 test_scores: dict[int, dict], rounds: list[dict], bytes_up: int, secure_aggregation: bool,
                 clipping_range: float | None, on_round: RoundCallback | None,
                 early_stopping: EarlyStopping | None = None) -> None:
        self.task, self.run_id, self.run_dir, self.ledger, self.strategy = task, run_id, run_dir, ledger, strategy
        self.test_scores = test_scores  # by round, filled by the coordinator's test-set evaluation
        self.rounds = rounds  # every metrics.jsonl record so far (a resume starts from the checkpoint's)
        self.bytes_up, self.secure_aggregation = bytes_up, secure_aggregation
        self.clipping_range, self.on_round = clipping_range, on_round
        self.early_stopping = early_stopping

    def after_round(self, server_round: int, seconds: float) -> bool:
        """Write the round's outputs; False when every sampled client refused or early stopping says
        so (the run stops; the server's ledger record of the round says why)."""
        outcome = self.strategy.outcomes.get(server_round) or RoundOutcome()
        self._warn_if_clipped(server_round, outcome)
        record = round_record(server_round=server_round, outcome=outcome,
                              test_scores=self.test_scores.get(server_round, {}), task=self.task, seconds=seconds,
                              bytes_up=self.bytes_up, secure_aggregation=self.secure_aggregation)
        if self.early_stopping is not None:
            record.update(self.early_stopping.after_round(server_round, self.strategy.global_arrays))
        fields = server_ledger_record(run_id=self.run_id, record=record, outcome=outcome, task=self.task,
                                      adapter_sha256=adapter_sha256(self.strategy.global_arrays))
        stop = every_client_refused(outcome) or "stopped_early" in record
        self.rounds.append(json_safe(record))
        Checkpoint(completed_round=server_round, stopped=stop, global_arrays=self.strategy.global_arrays,
                   rounds=self.rounds, server_ledger_fields=fields, initial_scores=self.test_scores.get(0, {}),
                   random_state=random_state()).save(self.run_dir.path)
        self.run_dir.append_round(record)
        self.ledger.append(fields)
        if self.on_round is not None:
            self.on_round(record)
        if stop and "stopped_early" not in record:
            log.warning("round %d: every sampled client refused (budget spent, or the job asks for less privacy "
                        "than their policies allow: see each client's reason in metrics.jsonl); stopping the run",
                        server_round)
        return not stop

    def _warn_if_clipped(self, server_round: int, outcome: RoundOutcome) -> None:
        if self.clipping_range is not None and outcome.max_update_abs > self.clipping_range:
            log.warning("round %d: an update coordinate reached %.4g, beyond the SecAgg+ clipping range "
                        "±%.4g, and was clipped; raise secagg-clipping-range", server_round,
                        outcome.max_update_abs, self.clipping_range)
