"""The client side of a fault drill (`inject-faults`): vanish at a chosen SecAgg+ stage or fit.

Only dropouts live here, as a mod around SecAgg+, because a vanished node is a missing reply.
Broken updates (NaN, wrong shape, 1000x) are made inside `fit`, before SecAgg+ masks them.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from common.config import RunConfig
from common.faults import DROP_FIT, DROP_STAGES, InjectedFault, client_fault

STAGE_FAULTS = {stage: fault for fault, stage in DROP_STAGES.items()} | {"fit": DROP_FIT}
AFTER_TRAINING = ("collect_masked_vectors", "fit")  # the client trains, signs, then vanishes


def fault_injection_mod(resolve_config: Callable[[Context], RunConfig]) -> Mod:
    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        spec = resolve_config(ctxt).inject_faults
        if not spec or msg.metadata.message_type != MessageType.TRAIN or "partition-id" not in ctxt.node_config:
            return call_next(msg, ctxt)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = str(configs[Key.STAGE]) if configs is not None else "fit"
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
