"""The last two steps of fedtune's SecAgg+ on the coordinator: the consistency check, then unmask.

Stands in for Flower 1.41's `SecAggPlusWorkflow.unmask_stage`
(flwr/server/workflow/secure_aggregation/secaggplus_workflow.py) for two reasons:
- the consistency check of Bonawitz et al. (CCS 2017, active adversary): every survivor signs the
  list of nodes whose masked vectors were summed, and each receives all the signatures with its
  unmask request, so no client reveals a node's pairwise key while another reveals the same
  node's self-mask seed (client/secagg_checks.py checks this at the node). Each node already
  signed the list it expects with its masked vector; only when someone dropped out after sharing
  keys does a consistency round ask the survivors to sign the shorter list;
- masks are regenerated with fedtune's full-strength generator (common/secure_aggregation/masks.py),
  which the clients used, not Flower's 32-bit-seeded one.
"""

from __future__ import annotations

import logging
from typing import Callable

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, get_parameters_shape, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedtune.common.protocol import SecAggWire
from fedtune.common.secure_aggregation.masks import mask_arrays

log = logging.getLogger(__name__)

Send = Callable[[list[Message]], list[Message]]


def _message(nid: int, config: dict, server_round: int) -> Message:
    return Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config)}), dst_node_id=nid,
                   message_type=MessageType.TRAIN, group_id=str(server_round))


def consistency_check(send: Send, state: WorkflowState, server_round: int) -> list[tuple[int, bool, bytes]]:
    """Ask each survivor to sign the survivor list; returns (signer, contributed, signature) per answer."""
    survivors = sorted(state.active_node_ids)
    replies = send([_message(nid, {Key.STAGE: SecAggWire.CONSISTENCY_STAGE, SecAggWire.SURVIVORS: survivors},
                             server_round) for nid in survivors])
    for msg in replies:
        if msg.has_error():
            state.failures.append(Exception(msg.error))
    return survivor_signatures(replies, state)


def survivor_signatures(replies: list[Message], state: WorkflowState) -> list[tuple[int, bool, bytes]]:
    """(signer, contributed, signature) for each survivor's signed survivor statement among `replies`."""
    signed = []
    for msg in replies:
        nid = msg.metadata.src_node_id
        if msg.has_error() or nid not in state.active_node_ids:
            continue
        signature = msg.content.config_records[RECORD_KEY_CONFIGS].get(SecAggWire.SURVIVOR_SIGNATURE)
        if isinstance(signature, bytes):
            signed.append((nid, _weight(state, nid) > 0, signature))
    return signed


def _weight(state: WorkflowState, nid: int) -> int:
    proxy = state.nid_to_proxies.get(nid)
    return next((res.num_examples for p, res in state.legacy_results if p is proxy), 0)


def unmask(send: Send, context: LegacyContext, state: WorkflowState, server_round: int,
           signed: list[tuple[int, bool, bytes]]) -> bool:
    """Collect key shares, remove every mask from the summed vector, hand the mean to the strategy."""
    active, dead = state.active_node_ids, state.sampled_node_ids - state.active_node_ids
    signers = [s for s, _, _ in signed]
    replies = send([_message(nid, {
        Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: sorted(state.nid_to_neighbours[nid] & active),
        Key.DEAD_NODE_ID_LIST: sorted(state.nid_to_neighbours[nid] & dead), SecAggWire.SIGNERS: signers,
        SecAggWire.CONTRIBUTED: [c for _, c, _ in signed], SecAggWire.SIGNATURES: [s for _, _, s in signed]},
        server_round) for nid in sorted(active)])
    shares: dict[int, list[bytes]] = {nid: [] for nid in state.sampled_node_ids}
    for msg in replies:
        if msg.has_error():
            state.failures.append(Exception(msg.error))
            continue
        record = msg.content.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True):
            shares[owner].append(share)
    if any(len(owner_shares) < state.threshold for owner_shares in shares.values()):
        log.error("not enough key shares to remove the masks")
        return False
    vector = _unmasked(state, shares, active)
    weight, vector = factor_extract(parameters_mod(vector, state.mod_range))
    mean = dequantize(vector, state.clipping_range, state.quantization_range)
    offset = -(len(active) - 1) * state.clipping_range
    for array in mean:
        array += offset
        array *= state.quantization_range / weight
    parameters = ndarrays_to_parameters(mean)
    for _, fitres in state.legacy_results:
        fitres.parameters = parameters
    aggregated, metrics = context.strategy.aggregate_fit(server_round, state.legacy_results, state.failures)
    if aggregated:
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(aggregated, True)
        context.history.add_metrics_distributed_fit(server_round=server_round, metrics=metrics)
    return True


def _unmasked(state: WorkflowState, shares: dict[int, list[bytes]], active: set[int]) -> list:
    """Subtract each survivor's self mask; for each dropout, undo the pairwise masks it shared."""
    vector = state.aggregate_ndarrays
    shapes = get_parameters_shape(vector)
    for nid, owner_shares in shares.items():
        secret = combine_shares(owner_shares)
        if nid in active:
            vector = [v - m for v, m in zip(vector, mask_arrays(secret, state.mod_range, shapes))]
            continue
        for neighbour in state.nid_to_neighbours[nid] - {nid}:
            shared = generate_shared_key(bytes_to_private_key(secret),
                                         bytes_to_public_key(state.nid_to_publickeys[neighbour][0]))
            sign = 1 if nid > neighbour else -1
            vector = [v + sign * m for v, m in zip(vector, mask_arrays(shared, state.mod_range, shapes))]
    return vector
