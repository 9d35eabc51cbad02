"""The coordinator's checkpoint: everything needed to continue a run after a crash.

Written after every round, atomically (temporary file, fsync, rename), *before* that round's
line in metrics.jsonl and its server-ledger record. So a crash at any moment leaves either the
previous checkpoint (the round is redone) or this one (the outputs are completed from it on
resume); never half of each.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.common.errors import FedtuneError
from fedtune.common.storage import load_npz, save_npz

CHECKPOINT_FILE = "checkpoint.npz"


@dataclass(frozen=True)
class Checkpoint:
    completed_round: int
    stopped: bool  # the run ended early (every sampled client refused): nothing left to run
    global_arrays: list[np.ndarray]
    rounds: list[dict]  # every metrics.jsonl record so far
    server_ledger_fields: dict  # what the server signs for `completed_round`
    initial_scores: dict  # test scores of the initial adapter (round 0)
    random_state: list  # Python's `random` state: Flower samples clients with it

    def save(self, run_dir: Path) -> None:
        meta = {"completed_round": self.completed_round, "stopped": self.stopped, "rounds": self.rounds,
                "server_ledger_fields": self.server_ledger_fields, "initial_scores": self.initial_scores,
                "random_state": self.random_state}
        save_npz(Path(run_dir) / CHECKPOINT_FILE, meta=meta, arrays=self.global_arrays)

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint | None:
        path = Path(run_dir) / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            meta, arrays = load_npz(path)
            return cls(completed_round=int(meta["completed_round"]), stopped=bool(meta["stopped"]),
                       global_arrays=arrays, rounds=list(meta["rounds"]),
                       server_ledger_fields=dict(meta["server_ledger_fields"]),
                       initial_scores=dict(meta["initial_scores"]), random_state=list(meta["random_state"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FedtuneError(f"{path} is unreadable ({exc}); the run cannot be resumed from it") from None


def random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_random_state(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))

