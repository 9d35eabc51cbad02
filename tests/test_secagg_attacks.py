"""SecAgg+ against a coordinator that deviates from the protocol: one test per deviation.

The real round loop (server/federation.py) drives the real ClientApp of three institutions
(client/app.py with every mod) in one process (simulations/inprocess.py); the coordinator's
deviation is an edit of its messages in flight. Each test asserts that every honest node refused
at the stage the deviation showed, that nothing was unmasked (no aggregate applied), and that the
reason is in metrics.jsonl, in the coordinator's ledger and in each refusing node's own ledger.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

from fedtune.common.ledger.audit import audit_run
from fedtune.common.ledger.chain import read_records
from fedtune.common.protocol import SecAggRefusal, SecAggWire
from fedtune.common.secure_aggregation.masks import mask_arrays
from fedtune.common.secure_aggregation.statements import key_statement
from fedtune.server.run_directory import RunDirectory
from fedtune.simulations.inprocess import federation, metrics, run

CLIENTS = [f"client-{p}" for p in range(3)]


@pytest.fixture
def config(tiny_config):
    """Three institutions, one round; DP off where the attack does not need it (faster training)."""
    return tiny_config(num_clients=3, clients_per_round=3, num_rounds=1, dp=False, secure_aggregation=True)


def _stage(msg):
    return msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)


def _config(msg):
    return msg.content.config_records[RECORD_KEY_CONFIGS]


def _refusals(run_dir, owner: str) -> list[dict]:
    return [r for r in read_records(run_dir / "ledgers" / owner / "ledger.jsonl")
            if r["status"] == "refused-secure-aggregation"]


def _assert_refused_everywhere(run_dir, *, stage: str, because: str, who=CLIENTS) -> dict:
    """Nothing unmasked, the reason in metrics.jsonl, the coordinator's ledger and each node's ledger."""
    [record] = metrics(run_dir)
    assert not record["update_applied"], record
    assert set(record["secagg_refusals"]) == set(who), record["secagg_refusals"]
    for institution in who:
        assert record["secagg_refusals"][institution].startswith(f"stage {stage}:")
        assert because in record["secagg_refusals"][institution], record["secagg_refusals"][institution]
        [refusal] = _refusals(run_dir, institution)
        assert refusal["request"] == "secure-aggregation" and because in refusal["reason"]
    [server, _saved_adapter] = read_records(run_dir / "ledgers" / "server" / "ledger.jsonl")
    assert server["secagg_refusals"] == record["secagg_refusals"] and not server["update_applied"]
    assert audit_run(target=run_dir).to_json()["exit_code"] == 0  # refusals are honest records
    return record


def test_an_honest_round_unmasks_the_sum_and_nobody_refuses(config, tmp_path):
    grid, run_dir = federation(config, tmp_path / "run")
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    assert record["update_applied"] and record["clients_trained"] == 3 and "secagg_refusals" not in record
    stages = [_stage(m) for m in grid.sent]
    # nobody dropped out: the survivor lists signed with the masked vectors agree, no consistency round
    assert stages.count(SecAggWire.CONSISTENCY_STAGE) == 0 and stages.count(Stage.UNMASK) == 3
    assert not any(_refusals(run_dir.path, c) for c in CLIENTS)


def test_threshold_1_is_refused_at_setup(config, tmp_path):
    def threshold_1(msg):
        if _stage(msg) == Stage.SETUP:
            _config(msg)[Key.THRESHOLD] = 1
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=threshold_1)
    run(grid, config, run_dir)
    _assert_refused_everywhere(run_dir.path, stage="setup", because="threshold 1 is too low for 3 sampled clients")
    assert not [m for m in grid.sent if _stage(m) == Stage.SHARE_KEYS]


@pytest.mark.slow
def test_a_node_allowing_for_a_colluder_needs_a_higher_threshold(config, tmp_path):
    """A split story about who dropped out, signed on both sides by c colluding institutions,
    rebuilds both masks of one node unless 2t > n + c. Nodes whose policy allows for one colluder
    refuse the majority threshold 3 of 5; a job that allows for it too asks 4, and the round runs."""
    config = config.with_overrides(num_clients=5, clients_per_round=5)
    policy = {p: {"secagg-max-colluders": 1} for p in range(5)}
    grid, run_dir = federation(config, tmp_path / "run", node_policy=policy)
    run(grid, config, run_dir)
    _assert_refused_everywhere(run_dir.path, stage="setup", because="needs 2 x threshold > sampled + 1",
                               who=[f"client-{p}" for p in range(5)])
    config = config.with_overrides(secagg_max_colluders=1)
    grid, run_dir = federation(config, tmp_path / "tighter", node_policy=policy)
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    assert record["update_applied"] and record["clients_trained"] == 5 and "secagg_refusals" not in record
    assert {_config(m)[Key.THRESHOLD] for m in grid.sent if _stage(m) == Stage.SETUP} == {4}


def test_share_count_1_is_refused_at_setup(config, tmp_path):
    def one_share(msg):
        if _stage(msg) == Stage.SETUP:
            _config(msg)[Key.SHARE_NUMBER] = 1
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=one_share)
    run(grid, config, run_dir)
    _assert_refused_everywhere(run_dir.path, stage="setup", because="share count 1 must lie between")


def test_a_key_list_holding_only_the_client_is_refused(config, tmp_path):
    def only_you(msg):
        if _stage(msg) == Stage.SHARE_KEYS:
            record = _config(msg)
            for key in [k for k in record if k.isdigit() and int(k) != msg.metadata.dst_node_id]:
                del record[key]
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=only_you)
    run(grid, config, run_dir)
    _assert_refused_everywhere(run_dir.path, stage=Stage.SHARE_KEYS, because="the key list holds 1 node(s)")


def test_a_substituted_public_key_is_refused(config, tmp_path):
    """The coordinator sits in the middle: it hands client-0 its own keys in place of client-1's."""
    targets = {}

    def man_in_the_middle(msg):
        if _stage(msg) == Stage.SETUP:
            targets.setdefault("victim", msg.metadata.dst_node_id)
        if _stage(msg) == Stage.SHARE_KEYS and msg.metadata.dst_node_id != targets["victim"]:
            record = _config(msg)
            key = str(targets["victim"])
            mine = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]
            record[key] = [*mine, *list(record[key])[2:]]
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=man_in_the_middle)
    run(grid, config, run_dir)
    victim = f"client-{targets['victim'] - 100}"
    others = [c for c in CLIENTS if c != victim]
    [record] = metrics(run_dir.path)
    assert not record["update_applied"]
    for institution in others:
        assert f"keys are not signed by {victim}" in record["secagg_refusals"][institution]
        assert _refusals(run_dir.path, institution)


def test_a_peer_outside_the_roster_is_refused(config, tmp_path):
    """A fake fourth peer whose keys are properly signed, by a key the roster does not hold."""
    outsider, run_ids = Ed25519PrivateKey.generate(), {}

    def add_outsider(msg):
        if _stage(msg) == Stage.SETUP:
            run_ids["run"] = _config(msg)[SecAggWire.RUN_ID]
        if _stage(msg) == Stage.SHARE_KEYS:
            pk1, pk2 = (public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2))
            statement = key_statement(run_id=run_ids["run"], server_round=1, node_id=999, institution="mallory",
                                      pk1=pk1, pk2=pk2)
            _config(msg)["999"] = [pk1, pk2, outsider.sign(statement), b"mallory"]
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=add_outsider)
    run(grid, config, run_dir)
    _assert_refused_everywhere(run_dir.path, stage=Stage.SHARE_KEYS,
                               because="'mallory', which the roster does not list")


def test_lying_about_who_dropped_out_is_caught_by_the_consistency_check(config, tmp_path):
    """client-4 really drops out after training, so the coordinator runs the consistency check. It
    tells one client (the victim) that D dropped out too, so that the victim reveals D's pairwise-mask
    key, while the others hear that D survived and reveal D's self-mask seed: with both, D's update
    would be unmasked alone. The victim signed a survivor list nobody else signed: it reveals nothing."""
    config = config.with_overrides(num_clients=5, clients_per_round=5,  # threshold 3
                                   inject_faults="1:drop-collect-masked-vectors:4")
    story = {}

    def split_story(msg):
        stage, dst = _stage(msg), msg.metadata.dst_node_id
        if stage == SecAggWire.CONSISTENCY_STAGE and not story:
            survivors = list(_config(msg)[SecAggWire.SURVIVORS])
            story.update(victim=dst, dropped=max(n for n in survivors if n != dst))
        if stage in (SecAggWire.CONSISTENCY_STAGE, Stage.UNMASK) and dst == story.get("victim"):
            key = SecAggWire.SURVIVORS if stage == SecAggWire.CONSISTENCY_STAGE else Key.ACTIVE_NODE_ID_LIST
            _config(msg)[key] = [n for n in _config(msg)[key] if n != story["dropped"]]
            if stage == Stage.UNMASK:
                _config(msg)[Key.DEAD_NODE_ID_LIST] = [*_config(msg)[Key.DEAD_NODE_ID_LIST], story["dropped"]]
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=split_story)
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    victim = f"client-{story['victim'] - 100}"
    assert list(record["secagg_refusals"]) == [victim]
    assert "only 1 survivor(s) signed this survivor list" in record["secagg_refusals"][victim]
    assert record["secagg_refusals"][victim].startswith("stage unmask:")
    # No share of D's pairwise key left any node: the victim refused, the others were (honestly)
    # told only client-4 dropped. The sum unmasked is the honest sum of the four survivors.
    assert story["dropped"] != 104
    _assert_no_pairwise_key_share_left(grid, story["dropped"])
    assert record["update_applied"] and record["clients_trained"] == 4


def _refusal(reply) -> SecAggRefusal | None:
    """The node's SecAggRefusal when `reply` is one (then it carries that record and nothing else)."""
    if reply.has_error() or SecAggWire.REFUSAL not in reply.content.config_records:
        return None
    assert set(reply.content.config_records) == {SecAggWire.REFUSAL} and not reply.content.array_records
    return SecAggRefusal.from_record(reply.content.config_records[SecAggWire.REFUSAL])


def _assert_no_pairwise_key_share_left(grid, node: int) -> None:
    """No unmask reply carried a share of `node`'s pairwise-mask key (only refusals answered such asks)."""
    answered = 0
    for reply in grid.replies:
        if not reply.has_error() and _refusal(reply) is None and _stage_of_reply(grid, reply) == Stage.UNMASK:
            assert RECORD_KEY_CONFIGS in reply.content.config_records  # an answer with shares, not a refusal
            assert node not in _dead_asked(grid, reply)
            answered += 1
    assert answered  # the honest unmask answers were looked at (the sum was unmasked from them)


def test_skipping_the_consistency_check_does_not_let_a_lie_through(config, tmp_path):
    """Nobody dropped out, so the coordinator skips the consistency round, and tells one client that
    D dropped to get D's pairwise-mask key from it. That client signed, with its masked vector, a
    survivor list holding D: it reveals nothing, and the honest sum of all four is unmasked."""
    config = config.with_overrides(num_clients=4, clients_per_round=4)  # threshold 3
    story = {}

    def lie_at_unmask(msg):
        if _stage(msg) == Stage.UNMASK and not story:
            active = list(_config(msg)[Key.ACTIVE_NODE_ID_LIST])
            story.update(victim=msg.metadata.dst_node_id, dropped=max(n for n in active
                                                                      if n != msg.metadata.dst_node_id))
            _config(msg)[Key.ACTIVE_NODE_ID_LIST] = [n for n in active if n != story["dropped"]]
            _config(msg)[Key.DEAD_NODE_ID_LIST] = [story["dropped"]]
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=lie_at_unmask)
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    victim = f"client-{story['victim'] - 100}"
    assert list(record["secagg_refusals"]) == [victim]
    assert "differ from the survivor list this node signed last" in record["secagg_refusals"][victim]
    [refusal] = _refusals(run_dir.path, victim)
    assert refusal["reason"].startswith("stage unmask:")
    assert not [m for m in grid.sent if _stage(m) == SecAggWire.CONSISTENCY_STAGE]
    _assert_no_pairwise_key_share_left(grid, story["dropped"])
    assert record["update_applied"] and record["clients_trained"] == 4


def test_a_consistency_list_may_not_add_a_node(config, tmp_path):
    """The consistency round may only shrink the survivor list each node signed with its masked
    vector: a list holding a node that never sent key shares (here a made-up one) is refused."""
    config = config.with_overrides(num_clients=4, clients_per_round=4, inject_faults="1:drop-collect-masked-vectors:3")

    def add_a_node(msg):
        if _stage(msg) == SecAggWire.CONSISTENCY_STAGE:
            _config(msg)[SecAggWire.SURVIVORS] = [*_config(msg)[SecAggWire.SURVIVORS], 999]
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=add_a_node)
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    assert not record["update_applied"]
    assert set(record["secagg_refusals"]) == {"client-0", "client-1", "client-2"}
    for reason in record["secagg_refusals"].values():
        assert reason.startswith("stage fedtune-consistency:") and "did not send this node key shares" in reason


def _stage_of_reply(grid, reply):
    sent = {m.metadata.message_id: m for m in grid.sent}
    return _stage(sent[reply.metadata.reply_to_message_id])


def _dead_asked(grid, reply):
    sent = {m.metadata.message_id: m for m in grid.sent}
    return list(_config(sent[reply.metadata.reply_to_message_id])[Key.DEAD_NODE_ID_LIST])


@pytest.mark.slow
def test_two_trained_clients_are_not_enough_for_any_node_to_unmask(config, tmp_path):
    """client-2's own policy allows far less epsilon than the job asks: it refuses (weight 0), so
    only two updates would be summed, and each of the two would learn the other's."""
    config = config.with_overrides(dp=True, target_epsilon=8.0)
    grid, run_dir = federation(config, tmp_path / "run", node_policy={2: {"target-epsilon": 0.01}})
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    assert record["clients"]["client-2"]["status"] == "refused-policy"  # the job asks more than it allows
    assert record["clients_trained"] == 2
    assert not record["update_applied"]
    for institution in ("client-0", "client-1", "client-2"):
        assert "2 signed contributor(s)" in record["secagg_refusals"][institution]
        assert _refusals(run_dir.path, institution)[0]["reason"].startswith("stage unmask:")
    # nobody revealed a share: the unmask replies were all refusals
    unmask_replies = [r for r in grid.replies if _stage_of_reply(grid, r) == Stage.UNMASK]
    assert len(unmask_replies) == 3
    assert all(_refusal(r) is not None and _refusal(r).stage == "unmask" for r in unmask_replies)


@pytest.mark.slow
def test_a_paid_round_is_not_replayed_into_a_different_set_of_contributors(config, tmp_path):
    """Round 1 is unmasked with all four institutions. The coordinator then asks round 1 again
    (the same run id, as a resume does) and keeps one institution out: the three that would
    re-send their paid update refuse, since the two sums could be subtracted to give the fourth's."""
    config = config.with_overrides(num_clients=4, clients_per_round=4)
    grid, run_dir = federation(config, tmp_path / "run")
    run(grid, config, run_dir)
    [first] = metrics(run_dir.path)
    assert first["update_applied"] and first["clients_trained"] == 4
    grid.tamper = lambda msg: None if msg.metadata.dst_node_id == 100 else msg  # client-0 is kept out
    again_dir = tmp_path / "again"  # the same run id, no checkpoint: round 1 is asked again
    again_dir.mkdir()
    for name in ("run.json", "config.toml"):
        (again_dir / name).write_bytes((run_dir.path / name).read_bytes())
    run(grid, config, RunDirectory.open_existing(again_dir), resume=True)
    [again] = metrics(again_dir)
    assert not again["update_applied"]
    for institution in ("client-1", "client-2", "client-3"):
        entry = again["clients"][institution]
        assert entry["status"] == "refused-replay" and "differenced" in entry["reason"]
        replay = [r for r in read_records(run_dir.path / "ledgers" / institution / "ledger.jsonl")
                  if r["status"] == "refused-replay"]
        assert len(replay) == 1 and replay[0]["round"] == 1


def test_the_mask_seed_carries_the_whole_shared_secret():
    """Two secrets that agree in Flower's 32-bit XOR fold still give unrelated masks."""
    a = bytes(range(32))
    b = bytearray(a)
    for i in range(0, 32, 8):  # flip the same bits in two words: the XOR of all words is unchanged
        b[i] ^= 0xFF
        b[i + 4] ^= 0xFF
    fold = [int.from_bytes(s[i:i + 4], "little") for s in (a, bytes(b)) for i in range(0, 32, 4)]
    assert np.bitwise_xor.reduce(fold[:8]) == np.bitwise_xor.reduce(fold[8:]) and a != bytes(b)
    mask_a, mask_b = (mask_arrays(s, 2**32, [(1000,)])[0] for s in (a, bytes(b)))
    assert (mask_a != mask_b).mean() > 0.99
    assert 0 <= mask_a.min() and mask_a.max() < 2**32 and abs(mask_a.mean() / 2**31 - 1) < 0.1
    assert np.array_equal(mask_a, mask_arrays(a, 2**32, [(1000,)])[0])  # the same secret, the same mask
