"""The two things a SecAgg+ client signs with its institution's identity key (its ledger key).

- `key_statement`: "in round r of run R, node n is institution I and advertises masking keys
  (pk1, pk2)". Peers verify it against the roster before agreeing on any secret, so a coordinator
  relaying keys cannot substitute its own (the man in the middle of every pairwise agreement).
- `survivor_statement`: "in round r of run R, in the session whose key list has digest S, the
  masked vectors summed came from exactly these nodes, and I contributed an update (or weight 0)".
  S (`session_digest`) covers every peer's fresh masking keys as the node accepted them at
  share-keys, and the Flower run: a signature from one session never verifies in another, even one
  the coordinator labels with the same run and round (the replay of survivor signatures that once
  unmasked one institution's update alone). This is the consistency check of Bonawitz et
  al. (CCS 2017, active adversary): a client reveals shares only after a threshold of peers signed
  the same survivor list, so the coordinator cannot tell some clients that a node dropped (to
  get its pairwise-mask key) and others that it survived (to get its self-mask seed). A node signs
  it first with its masked vector (every node that sent it key shares), and again, for a shorter
  list, only if someone dropped out; a list never grows back, so a node that signed a list without
  D never reveals D's self-mask seed.

Each statement starts with its own tag: neither can be mistaken for the other, nor for a ledger
record (canonical JSON objects) signed by the same key.
"""

from __future__ import annotations

import hashlib
import json

KEY_TAG = b"fedtune secagg+ key statement v1\n"
SURVIVOR_TAG = b"fedtune secagg+ survivor statement v2\n"
SESSION_TAG = b"fedtune secagg+ session v1\n"


def _body(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def key_statement(*, run_id: str, server_round: int, node_id: int, institution: str, pk1: bytes,
                  pk2: bytes) -> bytes:
    return KEY_TAG + _body({"run": run_id, "round": server_round, "node": node_id, "institution": institution,
                            "pk1": pk1.hex(), "pk2": pk2.hex()})


def session_digest(*, run_id: str, flower_run_id: str, server_round: int,
                   key_list: list[tuple[int, str, bytes, bytes]]) -> str:
    """The SecAgg+ session a node joined: the run, the round and the whole key list it accepted,
    (node id, institution, pk1, pk2) per peer. The keys are fresh each setup, so no two sessions
    share a digest."""
    peers = sorted([node_id, institution, pk1.hex(), pk2.hex()] for node_id, institution, pk1, pk2 in key_list)
    return hashlib.sha256(SESSION_TAG + _body({"run": run_id, "flower-run": flower_run_id, "round": server_round,
                                                "peers": peers})).hexdigest()


def survivor_statement(*, run_id: str, server_round: int, session: str, survivors: list[int], signer: int,
                       contributed: bool) -> bytes:
    return SURVIVOR_TAG + _body({"run": run_id, "round": server_round, "session": session,
                                 "survivors": sorted(survivors), "signer": signer, "contributed": contributed})
