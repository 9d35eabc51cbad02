"""The client side of SecAgg+, hardened against a coordinator that deviates from the protocol.

Stands in for Flower 1.41's `secaggplus_mod` (flwr/client/mod/secure_aggregation/secaggplus_mod.py)
with the same stages and message flow, so Flower's SecAgg+ workflow on the coordinator drives it
(server/secure_aggregation.py adds the signatures and the consistency check there). What changed:
- every step is checked first (client/secagg_checks.py): parameters, the signed key list against
  the roster, the survivor list; a refusal is signed in the node's ledger and sent as the stage's
  reply (a `SecAggRefusal` record: institution, stage, reason), so the coordinator records the
  reason and learns nothing else;
- the node signs its masking keys and the survivor list with its identity (ledger) key; the survivor
  statement names the session (a digest of the whole key list it accepted, fresh keys each setup),
  so no signature carries over from one session to another;
- the fit inside a session must name the session's run and round, or the node does not train;
- masks come from the whole shared secret through HKDF and ChaCha20, stochastic rounding from an
  OS-seeded generator (common/secure_aggregation/masks.py), not a 32-bit Mersenne Twister seed;
- a paid round's masked update leaves the node in one SecAgg+ session only (client/replay.py).
Every train request also notes its transport (client/policy_guard.py), so a node whose policy
requires secure aggregation refuses a plain request.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography.fernet import InvalidToken
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (share_keys_plaintext_concat,
                                                              share_keys_plaintext_separate)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key, generate_key_pairs,
                                                  private_key_to_bytes, public_key_to_bytes)

from fedtune.client.policy_guard import note_transport
from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.client.secagg_masking import masked_update
from fedtune.client.secagg_checks import (Peer, Refusal, RoundContext, int_list, key_list, peers_problem, setup_problem,
                                  survivors_problem, unmask_problem, value_of, verified_signers)
from fedtune.client.secagg_state import SecAggState
from fedtune.client.update_cache import UpdateCache
from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.chain import signing_key
from fedtune.common.protocol import FitInstructions, FitReport, SecAggRefusal, SecAggWire, Status
from fedtune.common.secure_aggregation.roster import Roster
from fedtune.common.secure_aggregation.statements import key_statement, session_digest, survivor_statement

# Flower's four stages with the consistency check between the last two; setup may restart a round.
# The consistency check runs only when someone dropped out after sharing keys: with nobody missing,
# the survivor list every node signed with its masked vector is already the same list.
STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, SecAggWire.CONSISTENCY_STAGE, Stage.UNMASK)
_MAY_SKIP = {(Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggNode:
    """Who this node is in secure aggregation, and what it requires."""

    institution: str  # its id in the roster and in its ledger
    ledger_dir: Path  # its identity key is the ledger key
    roster: Roster | None
    problem: str | None  # why it cannot take part at all (no roster, expired, not listed), or None
    min_contributors: int
    max_colluders: int  # policy secagg-max-colluders: the threshold must satisfy 2t > n + this
    policy_record: dict


def secure_aggregation_mod(node_of: Callable[[Context], SecAggNode]) -> Mod:
    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            note_transport(ctxt, secure_aggregation=False)
            return call_next(msg, ctxt)
        node, state = node_of(ctxt), SecAggState.load(ctxt)
        stage = configs.get(Key.STAGE)
        try:
            _check_sequence(state.stage, stage)
            if stage == Stage.SETUP:
                state = _new_round(msg, configs)
                if node.problem:
                    raise Refusal(node.problem)
            out = RecordDict()
            if stage == Stage.COLLECT_MASKED_VECTORS:
                reply, out = _collect_masked_vectors(state=state, configs=configs, node=node, msg=msg,
                                                     ctxt=ctxt, call_next=call_next)
            else:
                reply = _STEPS[stage](state=state, configs=configs, node=node)
        except Refusal as problem:
            refusal = SecAggRefusal.of(institution=node.institution, stage=stage, reason=str(problem))
            _sign_refusal(node, state, refusal)
            state.stage = Stage.UNMASK  # nothing of this round goes on: the next request must be a setup
            state.save(ctxt)
            log.warning("%s refused secure aggregation at %s", node.institution, refusal.describe())
            return Message(RecordDict({SecAggWire.REFUSAL: ConfigRecord(refusal.to_record(), False)}),
                           reply_to=msg)
        state.stage = str(stage)
        state.save(ctxt)
        out.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(reply, False)
        return Message(out, reply_to=msg)

    return mod


def _check_sequence(previous: str, stage: Any) -> None:
    if stage not in STAGES:
        raise Refusal("unknown SecAgg+ stage")
    expected = STAGES[STAGES.index(previous) + 1 if previous != STAGES[-1] else 0]
    if stage != Stage.SETUP and stage != expected and (previous, stage) not in _MAY_SKIP:
        raise Refusal(f"stage {stage} out of order after {previous}")


def _new_round(msg: Message, configs: ConfigRecord) -> SecAggState:
    try:
        server_round = int(msg.metadata.group_id)
    except ValueError:
        raise Refusal("malformed request: the message names no round") from None
    run_id = configs.get(SecAggWire.RUN_ID)
    return SecAggState(run_id=str(run_id) if isinstance(run_id, str) and run_id else str(msg.metadata.run_id),
                       flower_run_id=str(msg.metadata.run_id), server_round=server_round,
                       node_id=msg.metadata.dst_node_id)


def _setup(*, state: SecAggState, configs: ConfigRecord, node: SecAggNode) -> dict:
    state.sample_num = value_of(configs, Key.SAMPLE_NUMBER, int)
    state.share_num = value_of(configs, Key.SHARE_NUMBER, int)
    state.threshold = value_of(configs, Key.THRESHOLD, int)
    state.target_range = value_of(configs, Key.TARGET_RANGE, int)
    state.mod_range = value_of(configs, Key.MOD_RANGE, int)
    state.clipping_range = value_of(configs, Key.CLIPPING_RANGE, float)
    state.max_weight = value_of(configs, Key.MAX_WEIGHT, float)
    problem = setup_problem(sample_num=state.sample_num, share_num=state.share_num, threshold=state.threshold,
                            clipping_range=state.clipping_range, target_range=state.target_range,
                            mod_range=state.mod_range, max_weight=state.max_weight,
                            min_contributors=node.min_contributors, max_colluders=node.max_colluders)
    if problem:
        raise Refusal(problem)
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state.sk1, state.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
    state.sk2, state.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    statement = key_statement(run_id=state.run_id, server_round=state.server_round, node_id=state.node_id,
                              institution=node.institution, pk1=state.pk1, pk2=state.pk2)
    return {Key.PUBLIC_KEY_1: state.pk1, Key.PUBLIC_KEY_2: state.pk2, SecAggWire.INSTITUTION: node.institution,
            SecAggWire.KEY_SIGNATURE: signing_key(node.ledger_dir).sign(statement)}


def _share_keys(*, state: SecAggState, configs: ConfigRecord, node: SecAggNode) -> dict:
    peers, signatures = key_list(configs)
    own = Peer(node_id=state.node_id, institution=node.institution, pk1=state.pk1, pk2=state.pk2)
    problem = peers_problem(peers=peers, own=own, signatures=signatures, roster=node.roster,
                            at=_at(state), threshold=state.threshold, share_num=state.share_num,
                            min_contributors=node.min_contributors, max_colluders=node.max_colluders)
    if problem:
        raise Refusal(problem)
    state.session = session_digest(run_id=state.run_id, flower_run_id=state.flower_run_id,
                                   server_round=state.server_round,
                                   key_list=[(p.node_id, p.institution, p.pk1, p.pk2) for p in peers])
    state.peers = {p.node_id: p.institution for p in peers}
    state.pk1s = {p.node_id: p.pk1 for p in peers}
    state.rd_seed = os.urandom(32)
    seed_shares = create_shares(state.rd_seed, state.threshold, len(peers))
    sk1_shares = create_shares(state.sk1, state.threshold, len(peers))
    destinations, ciphertexts = [], []
    for index, peer in enumerate(peers):
        if peer.node_id == state.node_id:
            state.seed_shares[peer.node_id], state.sk1_shares[peer.node_id] = seed_shares[index], sk1_shares[index]
            continue
        shared = generate_shared_key(bytes_to_private_key(state.sk2), bytes_to_public_key(peer.pk2))
        state.ss2[peer.node_id] = shared
        plaintext = share_keys_plaintext_concat(state.node_id, peer.node_id, seed_shares[index], sk1_shares[index])
        destinations.append(peer.node_id)
        ciphertexts.append(encrypt(shared, plaintext))
    return {Key.DESTINATION_LIST: destinations, Key.CIPHERTEXT_LIST: ciphertexts}


def _collect_masked_vectors(*, state: SecAggState, configs: ConfigRecord, node: SecAggNode, msg: Message,
                            ctxt: Context, call_next: ClientAppCallable) -> tuple[dict, RecordDict]:
    sources = int_list(configs, Key.SOURCE_LIST)
    ciphertexts = configs.get(Key.CIPHERTEXT_LIST)
    if not isinstance(ciphertexts, list) or len(ciphertexts) != len(sources) or len(set(sources)) != len(sources):
        raise Refusal("malformed share list")
    if len(sources) + 1 < state.threshold:
        raise Refusal(f"shares from {len(sources)} peer(s) arrived, fewer than the threshold {state.threshold} "
                       f"needs")
    for source, ciphertext in zip(sources, ciphertexts):
        if source not in state.ss2 or not isinstance(ciphertext, bytes):
            raise Refusal(f"a share claims to come from node {source}, outside this round's key list")
        try:
            sender, receiver, seed_share, sk1_share = share_keys_plaintext_separate(decrypt(state.ss2[source],
                                                                                             ciphertext))
        except InvalidToken:
            raise Refusal(f"the share from node {source} does not decrypt (altered in transit)") from None
        if (sender, receiver) != (source, state.node_id):
            raise Refusal(f"the share from node {source} was addressed from {sender} to {receiver}")
        state.seed_shares[source], state.sk1_shares[source] = seed_share, sk1_share
    _check_fit_matches_session(state, msg)
    note_transport(ctxt, secure_aggregation=True, max_weight=state.max_weight,
                   peers=frozenset(state.peers.values()))
    out = call_next(msg, ctxt).content
    fitres = compat.recorddict_to_fitres(out, keep_input=True)
    report = FitReport.from_metrics(dict(fitres.metrics))
    state.contributed, state.fit_round = fitres.num_examples > 0, report.server_round
    masked = masked_update(state, parameters_to_ndarrays(fitres.parameters), fitres.num_examples,
                            masking_peers=sources)
    if state.contributed:  # this update never goes into a second session (client/replay.py)
        UpdateCache(node.ledger_dir).note_sent_masked(run_id=state.fit_run_id, server_round=state.fit_round)
    for record in out.array_records.values():
        record.clear()
    # Every node that shared keys is expected to survive: sign that list now, so a round nobody
    # drops out of needs no consistency check (the consistency stage replaces it with a sub-list).
    state.survivors = sorted([*sources, state.node_id])
    return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked],
            SecAggWire.SURVIVOR_SIGNATURE: _sign_survivors(state, node)}, out


def _check_fit_matches_session(state: SecAggState, msg: Message) -> None:
    """The fit trains for the run and round the session's statements are signed for, nothing else:
    otherwise a session labelled with one (run, round) could carry the training of another."""
    try:
        instructions = FitInstructions.from_config(compat.recorddict_to_fitins(msg.content, keep_input=True).config)
    except (FedtuneError, KeyError, TypeError, ValueError):
        raise Refusal("malformed request: the fit instructions do not parse") from None
    fit_run_id = instructions.run_id or str(msg.metadata.run_id)  # the client's name for the run
    if (fit_run_id, instructions.server_round, str(msg.metadata.run_id)) != \
            (state.run_id, state.server_round, state.flower_run_id):
        raise Refusal("the fit names another run or round than this SecAgg+ session was set up for")
    state.fit_run_id = fit_run_id


def _consistency(*, state: SecAggState, configs: ConfigRecord, node: SecAggNode) -> dict:
    survivors = int_list(configs, SecAggWire.SURVIVORS)
    problem = survivors_problem(survivors=survivors, signed_before=state.survivors, at=_at(state),
                                threshold=state.threshold)
    if problem:
        raise Refusal(problem)
    state.survivors = sorted(survivors)
    return {SecAggWire.SURVIVOR_SIGNATURE: _sign_survivors(state, node)}


def _sign_survivors(state: SecAggState, node: SecAggNode) -> bytes:
    statement = survivor_statement(run_id=state.run_id, server_round=state.server_round, session=state.session,
                                   survivors=state.survivors, signer=state.node_id, contributed=state.contributed)
    return signing_key(node.ledger_dir).sign(statement)


def _unmask(*, state: SecAggState, configs: ConfigRecord, node: SecAggNode) -> dict:
    active, dead = int_list(configs, Key.ACTIVE_NODE_ID_LIST), int_list(configs, Key.DEAD_NODE_ID_LIST)
    signers, contributed = int_list(configs, SecAggWire.SIGNERS), configs.get(SecAggWire.CONTRIBUTED)
    signatures = configs.get(SecAggWire.SIGNATURES)
    if not isinstance(contributed, list) or not isinstance(signatures, list) \
            or not len(signers) == len(contributed) == len(signatures):
        raise Refusal("malformed request: the survivor signatures are missing or do not line up")
    verified = verified_signers(signed=list(zip(signers, map(bool, contributed), signatures)),
                                survivors=state.survivors, peers=state.peers, roster=node.roster, at=_at(state),
                                session=state.session)
    problem = unmask_problem(active=active, dead=dead, survivors=state.survivors, peers=state.peers,
                             verified=verified, threshold=state.threshold, min_contributors=node.min_contributors)
    if problem:
        raise Refusal(problem)
    missing = [n for n in active if n not in state.seed_shares] + [n for n in dead if n not in state.sk1_shares]
    if missing:
        raise Refusal(f"asked for shares of node(s) {sorted(missing)} that never sent this node any")
    return {Key.NODE_ID_LIST: active + dead,
            Key.SHARE_LIST: [state.seed_shares[n] for n in active] + [state.sk1_shares[n] for n in dead]}


def _at(state: SecAggState) -> RoundContext:
    return RoundContext(run_id=state.run_id, server_round=state.server_round, node_id=state.node_id)


def _sign_refusal(node: SecAggNode, state: SecAggState, refusal: SecAggRefusal) -> None:
    ledger = ClientPrivacyLedger(directory=node.ledger_dir, client_id=node.institution)
    ledger.record(run_id=state.run_id, server_round=state.server_round, status=Status.REFUSED_SECURE_AGGREGATION,
                  plan=None, steps=0, epsilon=None, local_examples=0, policy=node.policy_record,
                  reason=refusal.describe(), request="secure-aggregation")


_STEPS: dict[str, Callable[..., dict]] = {Stage.SETUP: _setup, Stage.SHARE_KEYS: _share_keys,
                                          SecAggWire.CONSISTENCY_STAGE: _consistency, Stage.UNMASK: _unmask}
