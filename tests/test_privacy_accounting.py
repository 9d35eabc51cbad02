"""Epsilon is composed over every round a client trains, and matches an independent accountant."""

import pytest
from dp_accounting import dp_event, pld
from fedtune.client.fl_client import FedtuneClient
from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.common.privacy.accounting import compose, epsilon_of
from fedtune.common.privacy.plan import plan_privacy
from tests.conftest import initial_adapter


def independent_epsilon(*, sigma: float, rate: float, steps: int, delta: float) -> float:
    """Google's dp_accounting PLD accountant: a separate implementation from Opacus' PRV."""
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), steps)
    accountant = pld.PLDAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def test_calibrated_noise_spends_the_budget_over_the_planned_rounds():
    plan = plan_privacy(num_examples=356, batch_size=32, local_epochs=1, num_rounds=3,
                        target_epsilon=8.0, target_delta=1e-5)
    assert plan.sample_rate == pytest.approx(32 / 356) and plan.steps_per_round == 11
    history = []
    for _ in range(3):
        history = compose(history, plan.round_entry(1))
    assert history == [(plan.noise_multiplier, plan.sample_rate, 33)]
    spent = epsilon_of(history, delta=1e-5)
    assert 7.9 <= spent <= 8.0
    more = compose(history, plan.round_entry(1))
    assert epsilon_of(more, delta=1e-5) > 8.0  # a fourth round would not fit: the guard's case


def test_forced_noise_multiplier_is_used_as_given():
    plan = plan_privacy(num_examples=100, batch_size=10, local_epochs=2, num_rounds=5,
                        target_epsilon=1.0, target_delta=1e-5, noise_multiplier=0.7)
    assert plan.noise_multiplier == 0.7 and plan.steps_per_round == 20


def test_client_epsilon_over_rounds_equals_one_accountant_and_an_independent_one(tiny_config, tmp_path):
    config = tiny_config(num_rounds=3, target_epsilon=4.0, target_delta=1e-5)
    client = FedtuneClient(config=config, partition_id=0, ledger_dir=tmp_path, run_id="run-1")
    parameters = initial_adapter(config)
    reported = []
    for server_round in (1, 2, 3):
        update, n, metrics = client.fit(parameters, {"server-round": server_round})
        assert metrics["status"] == "trained" and n > 0
        parameters = [p + u for p, u in zip(parameters, update)]
        reported.append(metrics["epsilon"])
        # a fresh client object over the same ledger: what a new ClientApp call sees
        client = FedtuneClient(config=config, partition_id=0, ledger_dir=tmp_path, run_id="run-1")

    ledger = ClientPrivacyLedger(directory=tmp_path, client_id="client-0")
    plan, history = ledger.plan_for("run-1"), ledger.history()
    assert [r["epsilon"] for r in ledger.ledger.records] == reported
    steps = plan.steps_per_round
    assert history == [(plan.noise_multiplier, plan.sample_rate, 3 * steps)]
    assert reported == sorted(reported) and reported[0] < reported[1] < reported[2]
    for k, eps in enumerate(reported, start=1):
        whole = epsilon_of([(plan.noise_multiplier, plan.sample_rate, k * steps)], delta=1e-5)
        assert eps == pytest.approx(whole, rel=1e-9)
        other = independent_epsilon(sigma=plan.noise_multiplier, rate=plan.sample_rate, steps=k * steps,
                                    delta=1e-5)
        assert eps == pytest.approx(other, rel=0.02)
    # a fresh accountant per round would report the same (lower) number every round
    fresh = epsilon_of([(plan.noise_multiplier, plan.sample_rate, steps)], delta=1e-5)
    assert reported[2] > 1.3 * fresh
    assert reported[2] <= config.target_epsilon


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("rate, steps, target", [(0.064, 45, 8.0), (0.064, 45, 1.0), (0.01, 300, 3.0),
                                                 (0.5, 6, 8.0), (1.0, 3, 50.0)])
def test_calibration_meets_opacus_contract_in_few_accountant_calls(accountant, rate, steps, target):
    """The sigma spends at most the budget and at most 0.01 less, like Opacus' own bisection,
    whose answer it matches within 0.5%, with a third of its accountant calls or fewer."""
    from opacus.accountants.utils import get_noise_multiplier

    from fedtune.common.privacy.calibration import calibrate_sigma

    calls = []

    def epsilon_at(sigma):
        calls.append(sigma)
        return epsilon_of([(sigma, rate, steps)], delta=1e-5, accountant=accountant)

    sigma = calibrate_sigma(epsilon_at, target_epsilon=target, tolerance=0.01)
    assert target - 0.01 <= epsilon_of([(sigma, rate, steps)], delta=1e-5, accountant=accountant) <= target
    reference = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=rate, steps=steps,
                                     accountant=accountant, epsilon_tolerance=0.01)
    assert sigma == pytest.approx(reference, rel=5e-3)
    assert len(calls) <= 12


def test_an_unreachable_budget_is_an_error_not_a_hang():
    from fedtune.common.privacy.calibration import UnreachableBudget, calibrate_sigma

    with pytest.raises(UnreachableBudget):
        calibrate_sigma(lambda sigma: 1.0, target_epsilon=0.5)  # no noise ever brings epsilon under 0.5


def test_fedtune_plan_loads_no_torch_and_plans_what_a_client_plans():
    """`fedtune plan` uses Opacus' accountants without Opacus' torch-loading package."""
    import json
    import subprocess
    import sys

    code = ("import sys, json; from fedtune.plan_view import PlanRequest, load_accountants_without_torch, schedule_of; "
            "load_accountants_without_torch(); s = schedule_of(PlanRequest(target_epsilon=8.0, delta=1e-5, "
            "dataset_size=356, batch_size=32, local_epochs=1, rounds=3, accountant='prv', noise_multiplier=0.0, "
            "allow_large_delta=False)); print(json.dumps([s['noise_multiplier'], 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    sigma, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch_loaded is False
    plan = plan_privacy(num_examples=356, batch_size=32, local_epochs=1, num_rounds=3, target_epsilon=8.0,
                        target_delta=1e-5)
    assert sigma == plan.noise_multiplier
