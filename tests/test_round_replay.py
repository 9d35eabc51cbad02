"""A client asked again for a round it already trained (a resumed coordinator) re-sends the
update it paid for and never spends privacy twice for one round."""

from __future__ import annotations

import numpy as np

from client.fl_client import FedtuneClient
from client.update_cache import UpdateCache
from common.ledger.chain import read_records
from common.protocol import Status
from tests.conftest import initial_adapter

FIT = {"server-round": 1, "fedtune-run-id": "run-a"}


def _client(config, ledger_dir) -> FedtuneClient:
    return FedtuneClient(config=config, partition_id=0, ledger_dir=ledger_dir, run_id="flower-run-1")


def _records(ledger_dir):
    return read_records(ledger_dir / "ledger.jsonl")


def test_a_round_asked_twice_is_resent_not_retrained(tiny_config, tmp_path):
    config = tiny_config(dp=True)
    parameters = initial_adapter(config)
    first, n, metrics = _client(config, tmp_path).fit([p.copy() for p in parameters], dict(FIT))
    # A new process (new Flower run id, same fedtune run id) is asked for the same round.
    again, n_again, metrics_again = _client(config, tmp_path).fit([p.copy() for p in parameters], dict(FIT))
    assert n_again == n and metrics_again["resent"] is True
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # the same DP release, not a new one
    assert metrics_again["epsilon"] == metrics["epsilon"]
    records = _records(tmp_path)
    assert [(r["run_id"], r["round"]) for r in records] == [("run-a", 1)]  # one spend

    # Round 2 then trains normally and composes on top of round 1.
    _, _, second = _client(config, tmp_path).fit([p.copy() for p in parameters],
                                                 {"server-round": 2, "fedtune-run-id": "run-a"})
    assert second["epsilon"] > metrics["epsilon"] and "resent" not in second
    assert [r["round"] for r in _records(tmp_path)] == [1, 2]
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "sent-updates").iterdir()] == ["round-2.npz"]  # the latest


def test_a_round_asked_again_with_another_adapter_is_refused(tiny_config, tmp_path):
    config = tiny_config(dp=True)
    parameters = initial_adapter(config)
    _, _, metrics = _client(config, tmp_path).fit([p.copy() for p in parameters], dict(FIT))
    other = [p + 0.01 for p in parameters]
    update, n, refused = _client(config, tmp_path).fit(other, dict(FIT))
    assert n == 0 and refused["status"] == Status.ALREADY_SPENT and refused["epsilon"] == metrics["epsilon"]
    assert all(not u.any() for u in update)
    assert len(_records(tmp_path)) == 1


def test_an_update_cached_but_never_signed_is_signed_before_it_leaves(tiny_config, tmp_path):
    """A crash between caching the update and signing the ledger: nothing left the client yet, so
    re-sending it now is the first (and only) release, and it is signed first."""
    config = tiny_config(dp=True)
    parameters = initial_adapter(config)
    first, _, metrics = _client(config, tmp_path).fit([p.copy() for p in parameters], dict(FIT))
    # Simulate the crash window: drop the signed record, keep the cached update.
    for name in ("ledger.jsonl", "ledger.head"):
        (tmp_path / name).unlink()
    assert UpdateCache(tmp_path).load(run_id="run-a", server_round=1) is not None
    again, _, metrics_again = _client(config, tmp_path).fit([p.copy() for p in parameters], dict(FIT))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    [record] = _records(tmp_path)
    assert record["round"] == 1 and record["epsilon"] == metrics["epsilon"]
