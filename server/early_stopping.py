"""Early stopping on the coordinator's own validation split: rounds that no longer improve the model
would spend every client's budget for nothing.

The split is the coordinator's (held out like the test split, never a client's record), so the
decision costs no client any privacy and needs nothing from a client but the aggregate it sends
anyway. The test split never takes part in it, so the test score after a stop stays unbiased.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedtune.common.models.adapter import arrays_to_adapter
from fedtune.common.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass
class EarlyStopping:
    task: Task
    model: object  # the coordinator's model (shared with the test evaluation; arrays are loaded each time)
    dataset: object
    patience: int
    best: float = float("-inf")
    best_round: int = 0

    def restore(self, rounds: list[dict]) -> None:
        """After a resume: the best score so far, from the rounds metrics.jsonl already holds."""
        for record in rounds:
            self._update(record["round"], record.get(self.key))

    @property
    def key(self) -> str:
        return f"validation_{self.task.headline_metric}"

    def after_round(self, server_round: int, arrays: list[np.ndarray]) -> dict:
        """The round's validation score and, when patience has run out, why the run stops."""
        arrays_to_adapter(self.model, arrays)
        score = self.task.evaluate(model=self.model, dataset=self.dataset)[self.task.headline_metric]
        self._update(server_round, score)
        facts = {self.key: score, "early_stopping_patience": self.patience}
        waited = server_round - self.best_round
        if waited >= self.patience:
            facts["stopped_early"] = (f"validation {self.task.headline_metric} has not improved for {waited} "
                                      f"round(s) (best {self.best:.4f} after round {self.best_round}; "
                                      f"early-stopping-patience {self.patience})")
            log.warning("stopping after round %d: %s; every client keeps the rest of its budget", server_round,
                        facts["stopped_early"])
        return facts

    def _update(self, server_round: int, score: float | None) -> None:
        if score is not None and score > self.best:
            self.best, self.best_round = score, server_round
