"""What a node checks before each SecAgg+ step, so a coordinator that deviates is refused.

Each function returns why the step is refused (one line, naming parameters and node ids, never a
key or a data value), or None. Flower 1.41's client code accepts whatever parameters and key list
the coordinator sends; these checks are what make the protocol hold against a deviating one:
- setup: threshold t with 2t > n + c (n sampled, c the colluding institutions the node's policy
  allows for, 0 by default: a strict majority) and at least 2, shares at least the threshold,
  enough sampled clients for the node's minimum, sane quantization ranges;
- share keys: every peer's masking keys signed by a roster member for this round and node, no
  member twice, the node's own keys as it sent them, and the same counts as at setup;
- collect: the node signs the survivor list it expects (every node that sent it key shares);
- consistency (only when someone dropped out): the new list is a sub-list of the signed one;
- unmask: the survivor list is the last one this node signed, a threshold of survivors signed that
  same list in this same session (the digest of the key list it accepted), and enough of them
  contributed an update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import Key

from fedtune.common.secure_aggregation.roster import Roster
from fedtune.common.secure_aggregation.statements import key_statement, survivor_statement


class Refusal(Exception):
    """A step the node will not take; the text says why (it travels to the coordinator)."""


# -- reading a request: a malformed one is refused, never half-read ---------------------------

def value_of(configs: ConfigRecord, key: str, kind: type) -> Any:
    value = configs.get(key)
    if type(value) is not kind:  # bool is an int to isinstance: exact types only
        raise Refusal(f"malformed request: '{key}' missing or not {kind.__name__}")
    return value


def int_list(configs: ConfigRecord, key: str) -> list[int]:
    value = configs.get(key)
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        raise Refusal(f"malformed request: '{key}' missing or not a list of node ids")
    return list(value)


def key_list(configs: ConfigRecord) -> tuple[list[Peer], dict[int, bytes]]:
    """The share-keys request: node id -> [pk1, pk2, key signature, institution] for each peer."""
    peers, signatures = [], {}
    for key, value in configs.items():
        if key == Key.STAGE:
            continue
        if not key.isdigit() or not isinstance(value, list) or not all(isinstance(v, bytes) for v in value) \
                or len(value) not in (2, 4):
            raise Refusal("malformed key list")
        pk1, pk2, signature, institution = (*value, b"", b"")[:4]
        try:
            name = institution.decode()
        except UnicodeDecodeError:
            raise Refusal("malformed key list: an institution id is not text") from None
        peers.append(Peer(node_id=int(key), institution=name, pk1=pk1, pk2=pk2))
        signatures[int(key)] = signature
    return peers, signatures



@dataclass(frozen=True)
class RoundContext:
    run_id: str
    server_round: int
    node_id: int


def setup_problem(*, sample_num: int, share_num: int, threshold: int, clipping_range: float, target_range: int,
                  mod_range: int, max_weight: float, min_contributors: int, max_colluders: int = 0) -> str | None:
    if sample_num < min_contributors:
        return (f"{sample_num} clients sampled, this node joins SecAgg+ rounds of at least {min_contributors} "
                f"(policy secagg-min-contributors)")
    if threshold < 2 or 2 * threshold <= sample_num + max_colluders:
        return (f"threshold {threshold} is too low for {sample_num} sampled clients: this node needs 2 x threshold > "
                f"sampled + {max_colluders} (policy secagg-max-colluders) and at least 2, or a split story about "
                f"who dropped out could rebuild both of a node's masks")
    if share_num < threshold or share_num > sample_num:
        return f"share count {share_num} must lie between the threshold {threshold} and the {sample_num} sampled"
    if not (clipping_range > 0 and math.isfinite(clipping_range)) or not (max_weight > 0 and math.isfinite(max_weight)):
        return "clipping range and max weight must be positive numbers"
    if mod_range > 2**32 or mod_range & (mod_range - 1) or not 0 < target_range < mod_range:
        return "modulus must be a power of two at most 2**32 and above the quantization range"
    return None


@dataclass(frozen=True)
class Peer:
    node_id: int
    institution: str
    pk1: bytes
    pk2: bytes


def peers_problem(*, peers: list[Peer], own: Peer, signatures: dict[int, bytes], roster: Roster,
                  at: RoundContext, threshold: int, share_num: int, min_contributors: int,
                  max_colluders: int = 0) -> str | None:
    """The key list of the share-keys stage, checked against the roster and the setup counts."""
    mine = [p for p in peers if p.node_id == own.node_id]
    if not mine or (mine[0].pk1, mine[0].pk2, mine[0].institution) != (own.pk1, own.pk2, own.institution):
        return "the key list does not hold this node's own keys as it sent them"
    for peer in peers:
        statement = key_statement(run_id=at.run_id, server_round=at.server_round, node_id=peer.node_id,
                                  institution=peer.institution, pk1=peer.pk1, pk2=peer.pk2)
        signature = signatures.get(peer.node_id, b"")
        if peer.institution not in roster.members:
            return f"node {peer.node_id} claims to be {peer.institution!r}, which the roster does not list"
        if not roster.verifies(institution=peer.institution, statement=statement, signature=signature):
            return (f"node {peer.node_id}'s keys are not signed by {peer.institution} for this round (unsigned, "
                    f"substituted or replayed keys)")
    count = len(peers)
    if count < max(threshold, min_contributors) or count > share_num or 2 * threshold <= count + max_colluders:
        return (f"the key list holds {count} node(s): it must hold at least the threshold {threshold} and this "
                f"node's minimum {min_contributors}, at most {share_num} shares, and fewer than twice the threshold "
                f"less secagg-max-colluders ({max_colluders})")
    if len({p.institution for p in peers}) != count:
        return "the key list names one institution for two nodes"
    if len({k for p in peers for k in (p.pk1, p.pk2)}) != 2 * count:
        return "the key list repeats a public key"
    return None


def survivors_problem(*, survivors: list[int], signed_before: list[int], at: RoundContext,
                      threshold: int) -> str | None:
    """The consistency-check request: who the coordinator says sent masked vectors.

    The list may only shrink from the one this node signed with its masked vector: a node that
    once signed a list without node D never again signs one with D, so the survivors that reveal
    D's self-mask seed and the signers of a list that lets D's pairwise key out stay disjoint."""
    if len(set(survivors)) != len(survivors) or not set(survivors) <= set(signed_before) \
            or at.node_id not in survivors:
        return ("the survivor list names a node that did not send this node key shares, names one twice, or "
                "leaves this node out")
    if len(survivors) < threshold:
        return f"{len(survivors)} survivor(s) is below the threshold {threshold}"
    return None


def verified_signers(*, signed: list[tuple[int, bool, bytes]], survivors: list[int], peers: dict[int, str],
                     roster: Roster, at: RoundContext, session: str) -> dict[int, bool]:
    """signer -> contributed, for each survivor whose statement on this session's survivor list
    verifies against the roster. A statement signed in another session (an earlier round, a
    re-run of this one) never verifies: it names another key list."""
    valid: dict[int, bool] = {}
    for signer, contributed, signature in signed:
        if signer in valid or signer not in survivors:
            continue
        statement = survivor_statement(run_id=at.run_id, server_round=at.server_round, session=session,
                                       survivors=survivors, signer=signer, contributed=contributed)
        if roster.verifies(institution=peers[signer], statement=statement, signature=signature):
            valid[signer] = contributed
    return valid


def unmask_problem(*, active: list[int], dead: list[int], survivors: list[int], peers: dict[int, str],
                   verified: dict[int, bool], threshold: int, min_contributors: int) -> str | None:
    """The unmask request: the signed survivor list, and the dropouts whose pairwise keys it asks for."""
    if sorted(active) != sorted(survivors):
        return "the unmask request's survivors differ from the survivor list this node signed last"
    if set(dead) & set(active) or not set(dead) <= set(peers) or len(set(dead)) != len(dead):
        return "the unmask request names a node as both survivor and dropout, or a node outside the key list"
    if len(verified) < threshold:
        return (f"only {len(verified)} survivor(s) signed this survivor list in this session, the threshold is "
                f"{threshold}: the coordinator may have told others a different story about who dropped out, "
                f"or replayed signatures from another session")
    contributors = sum(verified.values())
    if contributors < min_contributors:
        return (f"{contributors} signed contributor(s), this node reveals its masks only for sums of at least "
                f"{min_contributors} (policy secagg-min-contributors)")
    return None
