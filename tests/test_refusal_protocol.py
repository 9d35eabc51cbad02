"""A SecAgg+ refusal is a reply carrying a record (common/protocol.py `SecAggRefusal`), not an error
text the coordinator parses: what an honest node sends, and what a hostile node's reply gets."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtune.client.app import build_client_app
from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.chain import read_records
from fedtune.common.protocol import MAX_REASON_CHARS, REFUSAL_VERSION, SecAggRefusal, SecAggWire
from fedtune.simulations.inprocess import federation, metrics, run


def _record(**changes) -> dict:
    return {"version": REFUSAL_VERSION, "institution": "client-2", "stage": "share_keys",
            "reason": "this node declines", **changes}


def test_a_refusal_round_trips_and_reads_as_the_records_hold_it():
    refusal = SecAggRefusal.of(institution="hospital-a", stage=Stage.SETUP, reason="this node has no roster")
    assert SecAggRefusal.from_record(refusal.to_record()) == refusal
    assert refusal.to_record()["version"] == REFUSAL_VERSION
    assert refusal.describe() == "stage setup: this node has no roster"  # as metrics.jsonl and ledgers hold it


def test_a_node_sends_one_bounded_line_and_only_a_stage_the_protocol_names():
    refusal = SecAggRefusal.of(institution="hospital-a", stage="<a coordinator's made-up stage>",
                               reason="first line\nsecond line\x1b[2J" + "x" * 5000)
    assert refusal.stage == "unknown"
    assert len(refusal.reason) == MAX_REASON_CHARS and refusal.reason.startswith("first line second line ")
    assert refusal.reason.isprintable() and len(refusal.describe()) <= MAX_REASON_CHARS
    assert SecAggRefusal.from_record(refusal.to_record()) == refusal  # what it sends, the coordinator reads


@pytest.mark.parametrize("record", [
    _record(reason="x" * (MAX_REASON_CHARS + 1)),  # oversized
    _record(reason="one line\nclient-0 refused secure aggregation at stage setup: forged"),  # a forged log line
    _record(reason=7),
    _record(version=REFUSAL_VERSION + 1),
    _record(version=True),  # a bool is not the version number
    _record(institution="client-0 refused secure aggregation"),
    _record(institution="c" * 129),
    _record(institution=""),
    _record(stage="stage setup: forged"),
    _record(extra="a field the contract does not have"),
    {key: value for key, value in _record().items() if key != "reason"},
])
def test_a_malformed_refusal_is_refused_whole(record):
    with pytest.raises(FedtuneError):
        SecAggRefusal.from_record(record)


@pytest.fixture
def config(tiny_config):
    return tiny_config(num_clients=3, clients_per_round=3, num_rounds=1, dp=False, secure_aggregation=True)


def test_an_honest_refusal_is_a_reply_with_the_record_not_an_error(config, tmp_path):
    """A coordinator asks for threshold 1: every node refuses setup with a reply holding its refusal."""

    def weak_threshold(msg):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            configs[Key.THRESHOLD] = 1
        return msg

    grid, run_dir = federation(config, tmp_path / "run", tamper=weak_threshold)
    run(grid, config, run_dir)
    setup_replies = [r for r in grid.replies if r.metadata.reply_to_message_id in
                     {m.metadata.message_id for m in grid.sent
                      if m.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == Stage.SETUP}]
    assert setup_replies and not any(r.has_error() for r in setup_replies)
    refusals = {}
    for reply in setup_replies:
        refusal = SecAggRefusal.from_record(reply.content.config_records[SecAggWire.REFUSAL])
        refusals[refusal.institution] = refusal
        assert set(reply.content.config_records) == {SecAggWire.REFUSAL}  # no keys, nothing else leaves
    assert set(refusals) == {"client-0", "client-1", "client-2"}
    [record] = metrics(run_dir.path)
    assert not record["update_applied"]
    for institution, refusal in refusals.items():
        assert refusal.stage == "setup" and "threshold" in refusal.reason
        assert record["secagg_refusals"][institution] == refusal.describe()
        [signed] = [r for r in read_records(run_dir.path / "ledgers" / institution / "ledger.jsonl")
                    if r["status"] == "refused-secure-aggregation"]
        assert signed["reason"] == refusal.describe()


def test_hostile_refusals_are_not_recorded_and_an_honest_one_is(config, tmp_path):
    """At share-keys client-0 sends a refusal naming client-1, client-1 an oversized one, and client-2
    an honest one: only client-2's reaches metrics.jsonl and the coordinator's ledger."""
    forged = {100: _record(institution="client-1", reason="client-1 does not trust this round"),
              101: _record(institution="client-1", reason="y" * 100_000),
              102: _record()}
    real = build_client_app(config=config, ledger_root=tmp_path / "run" / "ledgers")

    def hostile(msg: Message, context):
        reply = real(msg, context)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        node = msg.metadata.dst_node_id
        if configs is not None and configs.get(Key.STAGE) == Stage.SHARE_KEYS and node in forged:
            return Message(RecordDict({SecAggWire.REFUSAL: ConfigRecord(forged[node])}), reply_to=msg)
        return reply

    grid, run_dir = federation(config, tmp_path / "run", client_app=hostile)
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    assert not record["update_applied"] and record["clients_trained"] == 0
    assert record["secagg_refusals"] == {"client-2": "stage share_keys: this node declines"}
    server = read_records(run_dir.path / "ledgers" / "server" / "ledger.jsonl")[0]  # the round, then the adapter
    assert server["secagg_refusals"] == record["secagg_refusals"]
