"""The round loop: Flower's legacy workflows (fit via SecAgg+ or plain, evaluate) per round,
with a hook after each round that may end the run early."""

from __future__ import annotations

import logging
import timeit
from typing import Callable

from flwr.app import ConfigRecord
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (default_centralized_evaluation_workflow,
                                                     default_evaluate_workflow,
                                                     default_init_params_workflow)
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

Workflow = Callable[[Grid, LegacyContext], None]


def run_rounds(*, grid: Grid, context: LegacyContext, fit_workflow: Workflow, evaluate_clients: bool,
               after_round: Callable[[int, float], bool]) -> int:
    """Run up to `context.config.num_rounds` rounds; `after_round(round, seconds)` returns
    False to stop early. Returns the number of rounds completed."""
    thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
    registered.wait()
    completed = 0
    try:
        default_init_params_workflow(grid, context)  # initial adapter + round-0 evaluation
        cfg = ConfigRecord({Key.START_TIME: timeit.default_timer()})
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        for server_round in range(1, context.config.num_rounds + 1):
            started = timeit.default_timer()
            log.info("[ROUND %d]", server_round)
            cfg[Key.CURRENT_ROUND] = server_round
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
