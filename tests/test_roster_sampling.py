"""The coordinator samples only the roster (issue 29, finding 3): a stranger's registered node that is
sampled into a SecAgg+ round is dropped at setup, before anyone sees its keys, and replaced, so the
round completes for the institutions; once found out it is never sampled again.

In process (simulations/inprocess.py): three institutions and stranger nodes running fedtune's own
ClientApp with keys and a roster of their own, each claiming to be one of the institutions.
"""

from __future__ import annotations

import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtune.common.ledger.audit import audit_run
from fedtune.common.ledger.chain import read_records
from fedtune.simulations.inprocess import STRANGER_NODE_ID, federation, metrics, run

CLIENTS = [f"client-{p}" for p in range(3)]


@pytest.fixture
def config(tiny_config):
    return tiny_config(num_clients=3, clients_per_round=3, num_rounds=2, dp=False, secure_aggregation=True)


def _stage(msg) -> str | None:
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else record.get(Key.STAGE)


def test_a_stranger_is_dropped_at_setup_replaced_and_never_sampled_again(config, tmp_path):
    grid, run_dir = federation(config, tmp_path / "run", strangers=2)
    strangers = {STRANGER_NODE_ID, STRANGER_NODE_ID + 1}
    run(grid, config, run_dir)
    to_strangers = [m for m in grid.sent if m.metadata.dst_node_id in strangers]
    # The run's seed samples at least one stranger in round 1 (else this test would prove nothing).
    assert to_strangers, "no stranger was sampled: choose another seed"
    # A stranger got a setup request (public parameters) and nothing else: no peer's keys, no model.
    assert all(_stage(m) == Stage.SETUP and m.metadata.group_id == "1" for m in to_strangers)
    assert not any(m.content.array_records for m in to_strangers)
    assert all(isinstance(v, (int, float, str)) for m in to_strangers
               for v in m.content.config_records[RECORD_KEY_CONFIGS].values())
    share_keys = [m for m in grid.sent if _stage(m) == Stage.SHARE_KEYS]
    assert {m.metadata.dst_node_id for m in share_keys} == {100, 101, 102}
    assert not any(str(s) in m.content.config_records[RECORD_KEY_CONFIGS] for m in share_keys for s in strangers)

    rounds = metrics(run_dir.path)
    assert [r["update_applied"] for r in rounds] == [True, True], rounds
    assert all(r["clients_sampled"] == 3 and r["clients_trained"] == 3 and r["failures"] == 0 for r in rounds)
    assert all("secagg_refusals" not in r for r in rounds)  # no institution refused anything
    server = [r for r in read_records(run_dir.path / "ledgers" / "server" / "ledger.jsonl") if "update_applied" in r]
    assert [r["update_applied"] for r in server] == [True, True]
    assert all(sorted(r["replied"]) == CLIENTS for r in server), server
    for client in CLIENTS:  # each institution trained and paid both rounds, refused nothing
        records = read_records(run_dir.path / "ledgers" / client / "ledger.jsonl")
        assert [r["round"] for r in records if r["status"] == "trained"] == [1, 2]
        assert not [r for r in records if r["status"] == "refused-secure-aggregation"]
    assert audit_run(target=run_dir.path).to_json()["exit_code"] == 0


def test_without_enough_members_the_round_goes_on_with_those_that_remain(tiny_config, tmp_path):
    """Two institutions of three are up, with a stranger: no one replaces the stranger, and the two
    (their policy: two contributors suffice) still aggregate."""
    config = tiny_config(num_clients=3, clients_per_round=3, num_rounds=1, dp=False, secure_aggregation=True)
    grid, run_dir = federation(config, tmp_path / "run", strangers=1,
                               node_policy={p: {"secagg-min-contributors": 2} for p in range(2)})
    del grid.contexts[102]  # client-2's node is not connected
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    assert record["update_applied"] and record["clients_trained"] == 2 and record["failures"] == 1, record
    assert [m.metadata.dst_node_id for m in grid.sent if m.metadata.dst_node_id == STRANGER_NODE_ID] == [900]
