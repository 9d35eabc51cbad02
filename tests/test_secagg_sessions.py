"""SecAgg+ sessions: a signature, a label or a paid update never carries from one session to another.

The attacks of issue 29's first finding, through the real round loop and the real ClientApp of
three institutions in one process (simulations/inprocess.py). A hostile coordinator that kept
round 1's survivor signatures runs a second session labelled with round 1's run and round, has
the victim re-send its paid round-1 update while the others send weight 0, and presents the old
signatures at unmask: with the old statements every check passed and the "sum" was the victim's
update alone. Two rules stop it now: a survivor statement names its session (the key list the node
accepted), and a paid update that left a node masked never goes into a second session. Each test
asserts the refusal, what the ledgers record, and that no unmask reply of the attacked session
carried a key share (nothing to recover the victim's update from).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from fedtune.common.ledger.chain import read_records
from fedtune.common.protocol import SecAggWire
from fedtune.server import secure_aggregation as coordinator_secagg
from fedtune.server.node_identities import NodeIdentities
from fedtune.server.run_directory import RunDirectory
from fedtune.server.secagg_unmask import survivor_signatures
from fedtune.simulations.inprocess import federation, metrics, run

CLIENTS = ("client-0", "client-1", "client-2")
VICTIM = 100  # client-0's node id in the in-process grid
FIT_CONFIG, FIT_ARRAYS = "fitins.config", "fitins.parameters"


@pytest.fixture
def config(tiny_config):
    return tiny_config(num_clients=3, clients_per_round=3, num_rounds=1, dp=False, secure_aggregation=True)


@pytest.fixture
def hostile_coordinator(monkeypatch):
    """The coordinator drops its own rule against unmasking fewer than two trained updates (a
    hostile one would): what stands between it and one institution's update is the nodes' checks."""
    def collect_without_the_two_update_rule(self, grid, context, state):
        relay = self._relay(grid)
        ok = SecAggPlusWorkflow.collect_masked_vectors_stage(self, relay, context, state)
        self._note_refusals(context, relay)
        self._signed_at_collection = survivor_signatures(relay.replies, state)
        context.strategy.record_replies(coordinator_secagg._round(context), state.legacy_results, state.failures)
        return ok

    monkeypatch.setattr(coordinator_secagg.GuardedSecAggPlusWorkflow, "collect_masked_vectors_stage",
                        collect_without_the_two_update_rule)
    # nor does it check the key statements it relays (its own check would drop relabelled nodes)
    monkeypatch.setattr(NodeIdentities, "problem", lambda self, **_: None)


def _stage(msg):
    return msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)


def _secagg(msg):
    return msg.content.config_records[RECORD_KEY_CONFIGS]


def _ledger(run_dir, owner):
    return read_records(run_dir / "ledgers" / owner / "ledger.jsonl")


def _shares_released(grid, *, after: int) -> list[int]:
    """Nodes whose unmask reply (among the replies after the first `after`) carried key shares."""
    sent = {m.metadata.message_id: m for m in grid.sent}
    return [reply.metadata.src_node_id for reply in grid.replies[after:]
            if not reply.has_error() and SecAggWire.REFUSAL not in reply.content.config_records
            and _stage(sent[reply.metadata.reply_to_message_id]) == Stage.UNMASK]


def _ask_round_one_again(run_dir, tmp_path) -> RunDirectory:
    """The same fedtune run id with no checkpoint: the coordinator asks round 1 again, as after a crash."""
    again = tmp_path / "again"
    again.mkdir()
    for name in ("run.json", "config.toml"):
        (again / name).write_bytes((run_dir.path / name).read_bytes())
    return RunDirectory.open_existing(again)


def test_replayed_survivor_signatures_unmask_nothing(config, tmp_path, hostile_coordinator):
    """Round 1 runs honestly and the coordinator keeps its survivor signatures and the victim's
    global adapter. Round 2's session is labelled round 1: the victim is handed round 1's adapter
    (so it would re-send its paid update), the others get round 2's, and the unmask request
    carries round 1's signatures, which say all three contributed."""
    config = config.with_overrides(num_rounds=2)
    kept: dict = {}

    def replay(msg):
        stage, dst, group = _stage(msg), msg.metadata.dst_node_id, msg.metadata.group_id
        if group == "1":
            if stage == Stage.COLLECT_MASKED_VECTORS and dst == VICTIM:
                kept["adapter"] = msg.content.array_records[FIT_ARRAYS]
            if stage == Stage.UNMASK:
                kept["signed"] = {k: list(_secagg(msg)[k]) for k in
                                  (SecAggWire.SIGNERS, SecAggWire.CONTRIBUTED, SecAggWire.SIGNATURES)}
            return msg
        kept.setdefault("round-2-replies-from", len(grid.replies))
        msg.metadata.group_id = "1"  # the second session wears round 1's label
        if stage == Stage.COLLECT_MASKED_VECTORS:
            msg.content.config_records[FIT_CONFIG]["server-round"] = 1
            if dst == VICTIM:
                msg.content.array_records[FIT_ARRAYS] = kept["adapter"]
        if stage == Stage.UNMASK:
            _secagg(msg).update(kept["signed"])
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=replay)
    run(grid, config, run_dir)
    first, second = metrics(run_dir.path)
    assert first["update_applied"] and first["clients_trained"] == 3
    assert kept["signed"][SecAggWire.CONTRIBUTED] == [True, True, True]
    # Every paid update (the victim's too) already left its node masked in round 1's session:
    # each sends weight 0.
    assert second["clients_trained"] == 0
    for institution in CLIENTS:
        entry = second["clients"][institution]
        assert entry["status"] == "refused-replay" and "never put in a second one" in entry["reason"]
    # And no node revealed a share: round 1's signatures name another session's key list.
    assert not second["update_applied"]
    assert set(second["secagg_refusals"]) == set(CLIENTS)
    for institution in CLIENTS:
        reason = second["secagg_refusals"][institution]
        assert reason.startswith("stage unmask:") and "signed this survivor list in this session" in reason
        refusals = [r for r in _ledger(run_dir.path, institution) if r["status"] == "refused-secure-aggregation"]
        assert len(refusals) == 1 and refusals[0]["round"] == 1 and "in this session" in refusals[0]["reason"]
        # one paid round-1 update, no new spend: nothing trained under the second session
        assert [r["round"] for r in _ledger(run_dir.path, institution) if r["status"] == "trained"] == [1]
    assert _shares_released(grid, after=kept["round-2-replies-from"]) == []


def test_a_fit_for_another_round_inside_a_relabelled_session_is_not_trained(config, tmp_path, hostile_coordinator):
    """The reported attack's first half: the session is labelled round 1 (signatures for it were
    kept), the fit inside it asks round 2. Each node refuses before training: it pays nothing."""
    config = config.with_overrides(num_rounds=2)

    def relabel(msg):
        if msg.metadata.group_id == "2":
            msg.metadata.group_id = "1"
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=relabel)
    run(grid, config, run_dir)
    first, second = metrics(run_dir.path)
    assert first["update_applied"] and not second["update_applied"]
    for institution in CLIENTS:
        reason = second["secagg_refusals"][institution]
        assert reason.startswith(f"stage {Stage.COLLECT_MASKED_VECTORS}:")
        assert "another run or round than this SecAgg+ session" in reason
        records = _ledger(run_dir.path, institution)
        assert [r["round"] for r in records if r["status"] == "trained"] == [1]  # round 2 never trained
        assert [r["status"] for r in records][-1] == "refused-secure-aggregation"


def test_a_signature_from_another_session_never_verifies(tmp_path):
    """The same run, round, survivors and signer, in two sessions (fresh keys at each setup): a
    survivor statement signed in the first is rejected in the second; in its own it verifies."""
    from fedtune.client.secagg_checks import RoundContext, verified_signers
    from fedtune.common.ledger.chain import signing_key
    from fedtune.common.secure_aggregation.roster import Roster
    from fedtune.common.secure_aggregation.statements import session_digest, survivor_statement
    from fedtune.server.run_directory import write_simulation_roster

    roster = Roster.load(write_simulation_roster(tmp_path, num_clients=3))
    peers = {100 + p: f"client-{p}" for p in range(3)}
    at = RoundContext(run_id="run-1", server_round=1, node_id=100)

    def session() -> str:
        keys = [(nid, name, os.urandom(32), os.urandom(32)) for nid, name in peers.items()]
        return session_digest(run_id="run-1", flower_run_id="5", server_round=1, key_list=keys)

    first, second = session(), session()
    signed = [(nid, True, signing_key(tmp_path / name).sign(survivor_statement(
        run_id="run-1", server_round=1, session=first, survivors=sorted(peers), signer=nid, contributed=True)))
        for nid, name in peers.items()]
    check = dict(signed=signed, survivors=sorted(peers), peers=peers, roster=roster, at=at)
    assert verified_signers(**check, session=first) == {100: True, 101: True, 102: True}
    assert verified_signers(**check, session=second) == {}


@pytest.mark.slow
def test_a_paid_update_never_goes_into_a_second_session(config, tmp_path):
    """The reviewer's attack on a one-sum rule checked by the update's owner alone. Five
    institutions (threshold 3): round 1's unmask request is withheld from client-0 and client-1,
    the other three reveal and the sum is applied, so client-0 and client-1 never saw which sum
    their update went into. Round 1 is then asked again with client-4 handed another adapter
    (weight 0): had the four re-sent, sum 1 minus sum 2 would be client-4's update. Every node
    whose update left it masked in round 1 sends weight 0 instead; nothing is unmasked."""
    config = config.with_overrides(num_clients=5, clients_per_round=5)

    def withhold_unmask(msg):
        return None if _stage(msg) == Stage.UNMASK and msg.metadata.dst_node_id in (100, 101) else msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=withhold_unmask)
    run(grid, config, run_dir)
    [first] = metrics(run_dir.path)
    assert first["update_applied"] and first["clients_trained"] == 5
    before = len(grid.replies)

    def client_4_gets_another_adapter(msg):
        if _stage(msg) == Stage.COLLECT_MASKED_VECTORS and msg.metadata.dst_node_id == 104:
            record = msg.content.array_records[FIT_ARRAYS]
            key = next(iter(record))
            record[key] = Array(record[key].numpy() + np.float32(1e-3))
        return msg

    grid.tamper = client_4_gets_another_adapter
    again = _ask_round_one_again(run_dir, tmp_path)
    run(grid, config, again, resume=True)
    [second] = metrics(again.path)
    for institution in ("client-0", "client-1", "client-2", "client-3", "client-4"):
        entry = second["clients"][institution]
        assert entry["status"] == "refused-replay" and "never put in a second one" in entry["reason"]
        records = _ledger(run_dir.path, institution)
        assert [r["round"] for r in records if r["status"] == "trained"] == [1]  # no new spend
        assert [r["status"] for r in records][-1] == "refused-replay"
    assert not second["update_applied"] and second["clients_trained"] == 0
    assert _shares_released(grid, after=before) == []
