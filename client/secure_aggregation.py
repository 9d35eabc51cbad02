"""The client side of SecAgg+: Flower's `secaggplus_mod`, plus a guard against plain requests.

A client whose run asks for secure aggregation refuses a train request that arrives without
the SecAgg+ protocol, so a coordinator cannot quietly collect an unmasked update.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS


def secure_aggregation_mod(requires_secagg: Callable[[Context], bool]) -> Mod:
    """A mod that runs SecAgg+ when the server speaks it, and refuses plain training if required."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, ctxt, call_next)
        if requires_secagg(ctxt):
            raise PermissionError("this client requires SecAgg+ (secure-aggregation = true) but the "
                                  "server sent a plain training request; refusing to send an unmasked update")
        return call_next(msg, ctxt)

    return mod
