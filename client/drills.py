"""The client side of a fault drill (`inject-faults`), wrapped around the real client.

Nothing here runs unless a simulation's run config names a fault for this partition:
- `dropout_mod` makes a node vanish at a chosen SecAgg+ stage, or after it trained (a missing
  reply), as a mod around SecAgg+;
- `DrillClient` wraps the genuine `FedtuneClient` and breaks the update it produced (NaN,
  wrong shape, 1000x) before SecAgg+ masks it, or answers only after twice the round timeout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedtune.common.config import RunConfig
from fedtune.common.faults import CORRUPTIONS, DROP_FIT, DROP_STAGES, STALL, InjectedFault, client_fault
from fedtune.common.protocol import FitInstructions, FitReport, Status

log = logging.getLogger(__name__)

STAGE_FAULTS = {stage: fault for fault, stage in DROP_STAGES.items()} | {"fit": DROP_FIT}
AFTER_TRAINING = ("collect_masked_vectors", "fit")  # the client trains, signs, then vanishes


def dropout_mod(resolve_config: Callable[[Context], RunConfig]) -> Mod:
    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        spec = resolve_config(ctxt).inject_faults
        if not spec or msg.metadata.message_type != MessageType.TRAIN or "partition-id" not in ctxt.node_config:
            return call_next(msg, ctxt)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = str(configs[Key.STAGE]) if configs is not None else "fit"
        if stage not in STAGE_FAULTS:  # e.g. the consistency check: no drill vanishes there
            return call_next(msg, ctxt)
        server_round, partition_id = int(msg.metadata.group_id), int(ctxt.node_config["partition-id"])
        fault = client_fault(spec, server_round=server_round, partition_id=partition_id,
                             kinds=(STAGE_FAULTS[stage],))
        if fault is None:
            return call_next(msg, ctxt)
        if stage in AFTER_TRAINING:
            call_next(msg, ctxt)  # trained and signed its ledger: the spend is real
        raise InjectedFault(f"inject-faults: client {partition_id} vanishes in round {server_round} "
                            f"({'after' if stage in AFTER_TRAINING else 'at'} stage {stage})")

    return mod


class DrillClient(NumPyClient):
    """The real client, with a broken update or a stall where the drill plan says so."""

    def __init__(self, client: NumPyClient, *, config: RunConfig, partition_id: int) -> None:
        self.client, self.config, self.partition_id = client, config, partition_id

    def fit(self, parameters: list[np.ndarray], config: dict):
        update, num_examples, metrics = self.client.fit(parameters, config)
        report = FitReport.from_metrics(metrics)
        if report.status != Status.TRAINED or report.resent:  # drills hit freshly trained rounds only
            return update, num_examples, metrics
        server_round = FitInstructions.from_config(config).server_round
        fault = self._fault(server_round, CORRUPTIONS)
        if fault is not None:
            update = corrupt(update, fault)
            metrics = replace(report, update_max_abs=float(max(np.abs(u).max() for u in update))).to_metrics()
        if self._fault(server_round, (STALL,)):
            seconds = 2 * self.config.round_timeout if self.config.round_timeout else 60.0
            log.warning("client %d: inject-faults stalls round %d for %.0f s", self.partition_id, server_round,
                        seconds)
            time.sleep(seconds)
        return update, num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict):
        return self.client.evaluate(parameters, config)

    def _fault(self, server_round: int, kinds: tuple[str, ...]) -> str | None:
        return client_fault(self.config.inject_faults, server_round=server_round, partition_id=self.partition_id,
                            kinds=kinds)


def corrupt(update: list[np.ndarray], fault: str) -> list[np.ndarray]:
    """A drill's broken update, made before SecAgg+ would mask it."""
    if fault == "nan":
        return [np.full_like(u, np.nan) for u in update]
    if fault == "wrong-shape":
        return [u.reshape(-1)[: max(1, u.size // 2)].copy() for u in update]
    if fault == "scale-1000":
        return [u * 1000.0 for u in update]
    raise ValueError(f"not a corruption: {fault}")
