"""Bring an interrupted run directory back to its last checkpoint, and the process state with it."""

from __future__ import annotations

import logging

import numpy as np

from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.chain import Ledger
from fedtune.server.checkpoint import Checkpoint, restore_random_state
from fedtune.server.run_directory import RunDirectory

log = logging.getLogger(__name__)


def restore(*, run_dir: RunDirectory, ledger: Ledger, initial: list[np.ndarray]) -> Checkpoint | None:
    """The checkpoint to continue from (None: start again at round 1).

    metrics.jsonl is rewritten to exactly the checkpointed rounds (a round that was running at
    the crash is redone), and the server ledger gets the checkpointed round's record if the
    crash came between the checkpoint and the ledger append.
    """
    checkpoint = Checkpoint.load(run_dir.path)
    signed_rounds = [record["round"] for record in ledger.records]
    done = checkpoint.completed_round if checkpoint else 0
    if signed_rounds and signed_rounds[-1] > done:
        raise FedtuneError(f"the server ledger has round {signed_rounds[-1]} but the checkpoint only round "
                           f"{done}; {run_dir.path} was modified after the crash and cannot be resumed")
    if checkpoint is None:
        run_dir.rewrite_rounds([])
        log.info("resuming %s from round 1: it stopped before its first checkpoint", run_dir.path)
        return None
    if [a.shape for a in checkpoint.global_arrays] != [a.shape for a in initial]:
        raise FedtuneError(f"the checkpoint's adapter does not fit the model of {run_dir.path / 'config.toml'}")
    run_dir.rewrite_rounds(checkpoint.rounds)
    if not signed_rounds or signed_rounds[-1] < done:
        ledger.append(checkpoint.server_ledger_fields)
    restore_random_state(checkpoint.random_state)
    log.info("resuming %s after round %d", run_dir.path, done)  # the caller says it to the user
    return checkpoint


def first_round(checkpoint: Checkpoint | None, *, num_rounds: int) -> int:
    """The round to run next: after the checkpoint's, or none at all if the run had stopped."""
    if checkpoint is None:
        return 1
    return num_rounds + 1 if checkpoint.stopped else checkpoint.completed_round + 1
