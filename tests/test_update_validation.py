"""The strategy rejects malformed or oversized updates before they touch the global adapter."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedtune.client.fl_client import FedtuneClient
from fedtune.common.run_data import federated_splits
from fedtune.server.strategy import AdapterFedAvg
from fedtune.server.update_validation import update_norm_bound
from tests.conftest import initial_adapter

GLOBAL = [np.zeros((4, 3), dtype=np.float32), np.ones(3, dtype=np.float32)]


def _result(arrays, n, cid):
    return None, FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=n,
                        metrics={"client_id": cid, "status": "trained", "update_max_abs": 0.0})


def _strategy(secure: bool) -> AdapterFedAvg:
    return AdapterFedAvg(initial_arrays=GLOBAL, clients_per_round=5, num_clients=5, fraction_evaluate=0.0, run_id="r", label_names=["a", "b"],
                         score_names=("accuracy", "macro_f1"),
                         secure_aggregation=secure, max_update_norm=1.0)


def _update(value):
    return [np.full((4, 3), value, dtype=np.float32), np.full(3, value, dtype=np.float32)]


def test_plain_path_excludes_bad_clients_and_averages_the_rest():
    strategy = _strategy(secure=False)
    results = [
        _result(_update(0.01), 100, "client-0"),
        _result(_update(0.04), 300, "client-1"),
        _result([np.full((4, 3), np.nan, np.float32), np.zeros(3, np.float32)], 100, "client-2"),
        _result([np.zeros((3, 4), np.float32), np.zeros(3, np.float32)], 100, "client-3"),
        _result(_update(0.01 * 1000), 100, "client-4"),  # 1000x too large
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is not None
    outcome = strategy.outcomes[1]
    assert outcome.rejected == {
        "client-2": "contains NaN or Inf",
        "client-3": "has tensor 0 of shape (3, 4), expected (4, 3)",
        "client-4": "has L2 norm 38.73, above the bound 1 (max-update-norm)",
    }
    assert outcome.applied and outcome.aggregation_failed is None
    expected = (0.01 * 100 + 0.04 * 300) / 400
    new = parameters_to_ndarrays(params)
    np.testing.assert_allclose(new[0], np.full((4, 3), expected), rtol=1e-6)
    np.testing.assert_allclose(new[1], 1 + np.full(3, expected), rtol=1e-6)


def test_plain_path_with_only_bad_updates_applies_nothing():
    strategy = _strategy(secure=False)
    params, _ = strategy.aggregate_fit(1, [_result(_update(np.inf), 10, "client-0"),
                                           _result(_update(5.0), 10, "client-1")], [])
    assert params is None and strategy.outcomes[1].aggregation_failed == "every update was rejected"
    np.testing.assert_array_equal(strategy.global_arrays[1], GLOBAL[1])


@pytest.mark.parametrize("aggregate, reason", [
    (_update(np.nan), "contains NaN or Inf"),
    (_update(1000.0), "has L2 norm"),
    ([np.zeros(5, np.float32)], "has 1 tensors, the adapter has 2"),
])
def test_secagg_path_skips_a_bad_aggregate(aggregate, reason):
    strategy = _strategy(secure=True)
    # under SecAgg+ every result carries the one unmasked aggregate
    params, _ = strategy.aggregate_fit(1, [_result(aggregate, 10, "client-0"), _result(aggregate, 10, "client-1")], [])
    assert params is None and reason in strategy.outcomes[1].aggregation_failed
    np.testing.assert_array_equal(strategy.global_arrays[0], GLOBAL[0])


def test_secagg_path_applies_a_good_aggregate():
    """Under SecAgg+ the workflow hands every result the one unmasked weighted mean (one Parameters
    object, as Flower's does): the strategy adds it to the global adapter as it is, bit for bit, and
    keeps it for the next round. Averaging the results again (weights 1/7 and 6/7) would round many
    coordinates; a weight-0 refuser's result holds the aggregate too and is not counted."""
    rng = np.random.default_rng(7)
    start = [np.zeros((40, 30), np.float32), np.zeros(30, np.float32)]  # round 2 adds to round 1's result
    strategy = AdapterFedAvg(initial_arrays=[a.copy() for a in start], clients_per_round=3, num_clients=3,
                             fraction_evaluate=0.0, run_id="r", label_names=["a", "b"],
                             score_names=("accuracy", "macro_f1"), secure_aggregation=True, max_update_norm=1.0)
    expected = [a.copy() for a in start]
    for server_round in (1, 2):
        aggregate = [rng.normal(scale=0.01, size=a.shape).astype(np.float32) for a in start]
        shared = ndarrays_to_parameters(aggregate)
        results = []
        for cid, n, status, max_abs in (("client-0", 10, "trained", 0.5), ("client-1", 60, "trained", 0.75),
                                        ("client-2", 0, "refused-policy", 0.0)):
            results.append((None, FitRes(status=Status(Code.OK, ""), parameters=shared, num_examples=n,
                                         metrics={"client_id": cid, "status": status, "update_max_abs": max_abs})))
        params, aggregated_metrics = strategy.aggregate_fit(server_round, results, [])
        expected = [e + a for e, a in zip(expected, aggregate)]
        outcome = strategy.outcomes[server_round]
        assert outcome.applied and outcome.aggregation_failed is None and outcome.rejected == {}
        assert outcome.max_update_abs == 0.75 and aggregated_metrics == {"clients_trained": 2}
        for new, kept, want in zip(parameters_to_ndarrays(params), strategy.global_arrays, expected, strict=True):
            np.testing.assert_array_equal(new, want)
            np.testing.assert_array_equal(kept, want)


def test_an_honest_dp_update_is_well_inside_the_automatic_bound(tiny_config, tmp_path):
    config = tiny_config()
    parameters = initial_adapter(config)
    client = FedtuneClient(config=config, partition_id=0, ledger_dir=tmp_path, run_id="r")
    update, _, _ = client.fit([p.copy() for p in parameters], {"server-round": 1})
    norm = float(np.sqrt(sum(np.square(u).sum() for u in update)))
    bound = update_norm_bound(config=config, max_client_examples=federated_splits(config).max_client_examples,
                              num_parameters=sum(p.size for p in parameters))
    assert 0 < norm < bound / 3
    assert 1000 * norm > bound  # and an update 1000x too large is rejected
