"""A client asked again for a round it already trained (a resumed coordinator) re-sends the
update it paid for and never spends privacy twice for one round."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedtune.client.fl_client import FedtuneClient
from fedtune.client.update_cache import UpdateCache
from fedtune.common.ledger.chain import read_records
from fedtune.common.protocol import Status
from tests.conftest import initial_adapter

FIT = {"server-round": 1, "fedtune-run-id": "run-a"}


def _client(config, ledger_dir) -> FedtuneClient:
    return FedtuneClient(config=config, partition_id=0, ledger_dir=ledger_dir, run_id="flower-run-1")


def _records(ledger_dir):
    return read_records(ledger_dir / "ledger.jsonl")


@pytest.fixture(scope="module")
def first_fit(tiny_config, tmp_path_factory):
    """Round 1 of run-a trained once (DP): the config, the adapter it started from, the ledger
    folder it left, and what it sent. Each test continues from its own copy of the folder."""
    config = tiny_config(dp=True)
    parameters = initial_adapter(config)
    ledger = tmp_path_factory.mktemp("round-1") / "ledger"
    sent = _client(config, ledger).fit([p.copy() for p in parameters], dict(FIT))
    return config, parameters, ledger, sent


@pytest.fixture()
def after_round_1(first_fit, tmp_path):
    config, parameters, ledger, sent = first_fit
    copy = shutil.copytree(ledger, tmp_path / "ledger")
    return config, parameters, copy, sent


def test_a_round_asked_twice_is_resent_not_retrained(after_round_1):
    config, parameters, ledger, (first, n, metrics) = after_round_1
    # A new process (new Flower run id, same fedtune run id) is asked for the same round.
    again, n_again, metrics_again = _client(config, ledger).fit([p.copy() for p in parameters], dict(FIT))
    assert n_again == n and metrics_again["resent"] is True
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # the same DP release, not a new one
    assert metrics_again["epsilon"] == metrics["epsilon"]
    records = _records(ledger)
    assert [(r["run_id"], r["round"]) for r in records] == [("run-a", 1)]  # one spend

    # Round 2 then trains normally and composes on top of round 1.
    _, _, second = _client(config, ledger).fit([p.copy() for p in parameters],
                                               {"server-round": 2, "fedtune-run-id": "run-a"})
    assert second["epsilon"] > metrics["epsilon"] and "resent" not in second
    assert [r["round"] for r in _records(ledger)] == [1, 2]
    assert [p.name.split("-", 1)[1] for p in (ledger / "sent-updates").iterdir()] == ["round-2.npz"]  # the latest


def test_a_round_asked_again_with_another_adapter_is_refused(after_round_1):
    config, parameters, ledger, (_, _, metrics) = after_round_1
    other = [p + 0.01 for p in parameters]
    update, n, refused = _client(config, ledger).fit(other, dict(FIT))
    assert n == 0 and refused["status"] == Status.ALREADY_SPENT and refused["epsilon"] == metrics["epsilon"]
    assert all(not u.any() for u in update)
    assert len(_records(ledger)) == 1


def test_an_update_cached_but_never_signed_is_signed_before_it_leaves(after_round_1):
    """A crash between caching the update and signing the ledger: nothing left the client yet, so
    re-sending it now is the first (and only) release, and it is signed first."""
    config, parameters, ledger, (first, _, metrics) = after_round_1
    # Simulate the crash window: drop the signed record, keep the cached update.
    for name in ("ledger.jsonl", "ledger.head"):
        (ledger / name).unlink()
    assert UpdateCache(ledger).load(run_id="run-a", server_round=1) is not None
    again, _, metrics_again = _client(config, ledger).fit([p.copy() for p in parameters], dict(FIT))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    [record] = _records(ledger)
    assert record["round"] == 1 and record["epsilon"] == metrics["epsilon"]
