"""The round loop: Flower's legacy workflows (fit via SecAgg+ or plain, evaluate) per round,
with a hook after each round that may end the run early."""

from __future__ import annotations

import logging
import timeit
from typing import Callable

from flwr.app import ConfigRecord
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
import flwr.compat.common.recorddict_compat as compat
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (default_centralized_evaluation_workflow,
                                                     default_evaluate_workflow, default_fit_workflow,
                                                     default_init_params_workflow)
from flwr.serverapp import Grid

from fedtune.server.node_identities import wait_for_nodes

log = logging.getLogger(__name__)

Workflow = Callable[[Grid, LegacyContext], None]


def run_rounds(*, grid: Grid, context: LegacyContext, fit_workflow: Workflow, evaluate_clients: bool,
               after_round: Callable[[int, float], bool], start_round: int = 1) -> int:
    """Run rounds `start_round`..`context.config.num_rounds`; `after_round(round, seconds)`
    returns False to stop early. Returns the last round completed.

    A fresh run (start_round 1) takes the strategy's initial adapter and evaluates it as round
    0; a resumed run takes the strategy's initial adapter (the checkpoint's) as it is.
    """
    completed = start_round - 1
    if start_round > context.config.num_rounds:
        return completed
    thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
    registered.wait()
    try:
        if start_round == 1:
            default_init_params_workflow(grid, context)  # initial adapter + round-0 evaluation
        else:
            initial = context.strategy.initialize_parameters(client_manager=context.client_manager)
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(initial, True)
        cfg = ConfigRecord({Key.START_TIME: timeit.default_timer()})
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        for server_round in range(start_round, context.config.num_rounds + 1):
            log.info("[ROUND %d]", server_round)
            cfg[Key.CURRENT_ROUND] = server_round
            # Say whom the round waits for, and give up in time (Flower's own wait is silent, 24 h).
            wait_for_nodes(context.client_manager, getattr(context.strategy, "min_available_clients", 0),
                           identities=getattr(context.strategy, "identities", None))
            started = timeit.default_timer()
            fit_workflow(grid, context)
            default_centralized_evaluation_workflow(grid, context)
            if evaluate_clients:
                default_evaluate_workflow(grid, context)
            completed = server_round
            if not after_round(server_round, timeit.default_timer() - started):
                break
    finally:
        stop.set()
        thread.join()
    return completed


class _GridWithTimeout:
    """A grid whose `send_and_receive` waits at most `timeout` seconds unless told otherwise."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self._grid, self._timeout = grid, timeout

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self._grid.send_and_receive(messages, timeout=self._timeout if timeout is None else timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def plain_fit_workflow(timeout: float | None) -> Workflow:
    """Flower's default fit workflow, which waits forever for every client, with a round timeout:
    a straggler's reply that comes later is dropped and the round goes on with the others."""
    if not timeout:
        return default_fit_workflow
    return lambda grid, context: default_fit_workflow(_GridWithTimeout(grid, timeout), context)
