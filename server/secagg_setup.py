"""The coordinator's SecAgg+ setup with a roster: who may go on to share keys, and who takes the
place of a node that may not (server/node_identities.py says why it matters).

Each setup reply's key statement is verified as the peers will verify it (the roster's key of the
institution the node names, for this run, round and node); a node that fails is taken out of the
round before share-keys, so no peer ever sees its keys, and its place goes to a node not yet tried
this round (identified members first), sent the same setup. A place nobody fills leaves the round:
the others go on if the threshold still holds. Flower's WorkflowState is edited the way its own
stages edit it: the sampled set, the neighbour sets, the fit instructions and proxies.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedtune.common.protocol import MAX_REASON_CHARS, SecAggWire
from fedtune.common.secure_aggregation.statements import key_statement
from fedtune.server.node_identities import NodeIdentities

log = logging.getLogger(__name__)


def admit(replies: list[Message], state: WorkflowState, *, identities: NodeIdentities | None, run_id: str,
          server_round: int, outcome) -> set[int]:
    """Attach each setup reply's signature and institution to its keys (relayed to its peers at
    share-keys); with a roster, drop each node whose key statement does not verify. Returns the
    nodes that failed setup (errors included)."""
    failed = set()
    for msg in replies:
        nid = msg.metadata.src_node_id
        if msg.has_error() or nid not in state.nid_to_publickeys:
            failed.add(nid)
            continue
        config = msg.content.config_records[RECORD_KEY_CONFIGS]
        signature, institution = config.get(SecAggWire.KEY_SIGNATURE), config.get(SecAggWire.INSTITUTION)
        if identities is not None:
            pk1, pk2 = state.nid_to_publickeys[nid][:2]
            statement = key_statement(run_id=run_id, server_round=server_round, node_id=nid, institution=institution,
                                      pk1=pk1, pk2=pk2) if isinstance(institution, str) else None
            why = identities.problem(institution=institution, signature=signature, statement=statement)
            if why is not None:
                identities.reject(nid, why)
            elif institution in {identities.members.get(other) for other in state.active_node_ids - {nid}}:
                why = f"{institution} already takes part in this round"  # its second node: this round only
            if why is not None:
                failed.add(nid)
                drop(state, nid, outcome=outcome, server_round=server_round, why=why)
                continue
            identities.identify(nid, institution)
        if isinstance(signature, bytes) and isinstance(institution, str):
            state.nid_to_publickeys[nid] += [signature, institution.encode()]
    return failed


def drop(state: WorkflowState, nid: int, *, outcome, server_round: int, why: str) -> None:
    """Take a node out of the round before anyone sees its keys."""
    state.active_node_ids.discard(nid)
    state.nid_to_publickeys.pop(nid, None)
    if outcome is not None:
        outcome.dropped_at_setup[nid] = why[:MAX_REASON_CHARS]
    log.warning("round %d: node %d dropped before share-keys: %s", server_round, nid, why)


def replace(send: Callable[[list[Message]], list[Message]], state: WorkflowState, *, failed: set[int],
            identities: NodeIdentities, client_manager, setup: ConfigRecord, fitins: Callable[[], RecordDict],
            run_id: str, server_round: int, outcome) -> None:
    """Give each failed node's place to a node not tried this round, sent the same `setup`; repeat
    while nodes fail and others remain."""
    tried = set(state.sampled_node_ids) | failed
    while failed:
        fresh = identities.candidates(client_manager, exclude=tried)[:len(failed)]
        places = sorted(failed)
        for place, proxy in zip(places, fresh):
            swap(state, place, proxy.node_id, proxy=proxy, fitins=fitins())
        for place in places[len(fresh):]:
            swap(state, place, None)
        if not fresh:
            return
        log.info("round %d: %d node(s) take the places of %d that failed setup", server_round, len(fresh), len(failed))
        tried |= {proxy.node_id for proxy in fresh}
        replies = send([Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(setup.items()))}),
                                dst_node_id=proxy.node_id, message_type=MessageType.TRAIN, group_id=str(server_round))
                        for proxy in fresh])
        for msg in replies:
            if not msg.has_error():
                keys = msg.content.config_records[RECORD_KEY_CONFIGS]
                state.nid_to_publickeys[msg.metadata.src_node_id] = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]
                state.active_node_ids.add(msg.metadata.src_node_id)
        failed = admit(replies, state, identities=identities, run_id=run_id, server_round=server_round,
                       outcome=outcome)
        failed |= {proxy.node_id for proxy in fresh} - state.active_node_ids - failed  # no reply at all


def swap(state: WorkflowState, old: int, new: int | None, *, proxy=None, fitins: RecordDict | None = None) -> None:
    """`new` takes `old`'s place among the sampled nodes and in every neighbour set (None: the place
    is gone)."""
    state.sampled_node_ids.discard(old)
    neighbours = state.nid_to_neighbours.pop(old, set())
    state.nid_to_fitins.pop(old, None)
    state.nid_to_proxies.pop(old, None)
    for others in state.nid_to_neighbours.values():
        if old in others:
            others.discard(old)
            if new is not None:
                others.add(new)
    if new is not None:
        state.sampled_node_ids.add(new)
        state.nid_to_neighbours[new] = (neighbours - {old}) | {new}
        state.nid_to_fitins[new], state.nid_to_proxies[new] = fitins, proxy
