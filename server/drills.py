"""The coordinator side of a fault drill (`inject-faults`): `crash-coordinator` SIGKILLs the
coordinator once a round's replies are in, before its checkpoint. It wraps the real fit
workflow; nothing here runs unless the run config names the fault. A grid that shares its process
with its caller (the in-process engine) says how it dies instead: `kill_coordinator`."""

from __future__ import annotations

import logging
import os
import signal

from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from fedtune.common.faults import coordinator_crashes
from fedtune.server.rounds import Workflow

log = logging.getLogger(__name__)


class CoordinatorKilled(BaseException):
    """The crash drill where SIGKILL would take the caller with it. A BaseException, like the
    signal it stands for, so no `except Exception` in the round loop turns it into a failed round."""


def crash_after_fit(fit_workflow: Workflow, *, spec: str) -> Workflow:
    """`fit_workflow`, then a SIGKILL of this process in the rounds the plan `spec` names."""

    def workflow(grid: Grid, context: LegacyContext) -> None:
        fit_workflow(grid, context)
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if coordinator_crashes(spec, server_round=server_round):
            log.error("inject-faults: killing the coordinator after round %d's replies, before its checkpoint",
                      server_round)
            kill = getattr(grid, "kill_coordinator", None)
            if kill is not None:
                kill(server_round)
            os.kill(os.getpid(), signal.SIGKILL)

    return workflow
