"""The client side of SecAgg+: Flower's `secaggplus_mod`, plus a note of how a request came.

The mod records, for every train request, whether it arrived under SecAgg+ (client/policy_guard.py):
a node whose policy requires secure aggregation then refuses a plain request in its ledger and
reply, so a coordinator cannot quietly collect an unmasked update.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.policy_guard import note_transport


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run SecAgg+ when the server speaks it; note the transport either way for the policy check."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    secure = RECORD_KEY_CONFIGS in msg.content.config_records
    note_transport(ctxt, secure_aggregation=secure)
    return secaggplus_mod(msg, ctxt, call_next) if secure else call_next(msg, ctxt)
