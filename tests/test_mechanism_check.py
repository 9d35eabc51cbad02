"""The mechanism check: the client's own DP-SGD step on canaries, and a lower bound on epsilon that
stays under the accountant's claim when the step is honest and exceeds it when the step is broken."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from fedtune.client.mechanism_check import FAULTS, check_mechanism, check_run
from fedtune.client.mechanism_stats import bound_rates, claim_profile, trial_statistic
from fedtune.common.errors import FedtuneError

# A check as `fedtune audit --mechanism` runs it: one-step trials, a million of them.
SIGMA, RATE, STEPS, DELTA, TRIALS = 1.0, 0.05, 1, 1e-5, 1_000_000


@pytest.fixture(scope="module")
def honest():
    return check_mechanism(noise_multiplier=SIGMA, sample_rate=RATE, max_grad_norm=1.0, delta=DELTA,
                           steps=STEPS, trials=TRIALS, seed=0)


@pytest.mark.slow
def test_an_honest_step_stays_under_its_claim_with_a_bound_worth_having(honest):
    assert not honest.finding, honest.describe()
    assert honest.lower_epsilon < honest.claim_epsilon
    assert honest.tightness >= 0.5, honest.describe()  # at least half the claim where it comes closest
    # The canary-out entries carry exactly the recorded noise; the canary-in ones, C times q.
    assert honest.measured_sigma == pytest.approx(SIGMA, rel=0.01)
    assert honest.measured_rate == pytest.approx(RATE, rel=0.1)
    assert honest.claim_epsilon == pytest.approx(honest.claim_epsilon_pld, rel=0.05)  # PRV and PLD agree


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_each_broken_step_is_caught(fault):
    result = check_mechanism(noise_multiplier=SIGMA, sample_rate=RATE, max_grad_norm=1.0, delta=DELTA,
                             steps=STEPS, trials=TRIALS, seed=1, fault=fault)
    assert result.finding, result.describe()
    assert result.tightest_lower > result.tightest_claim


def _ideal_scores(rng, *, sigma, rate, trials, steps, contribution=1.0):
    """Scores as an honest (or broken) step makes them: canary sampled with `rate`, plus noise."""
    inside = (rng.random((trials, steps)) < rate) * contribution + sigma * rng.standard_normal((trials, steps))
    return inside, sigma * rng.standard_normal((trials, steps))


def test_the_statistics_raise_no_false_alarm_and_catch_a_doubled_rate_on_ideal_scores():
    profile = claim_profile(noise_multiplier=SIGMA, sample_rate=RATE, steps=STEPS, delta=DELTA)
    ratios = {}
    for rate in (RATE, 2 * RATE):
        found = []
        for seed in range(5):
            rng = np.random.default_rng(seed)
            inside, outside = _ideal_scores(rng, sigma=SIGMA, rate=rate, trials=TRIALS, steps=STEPS)
            rates = bound_rates(inside=trial_statistic(inside, noise_multiplier=SIGMA, sample_rate=RATE),
                                outside=trial_statistic(outside, noise_multiplier=SIGMA, sample_rate=RATE),
                                profile=profile, rng=rng)
            found.append(max(rates.epsilon(d) / c for d, c in zip(profile.deltas, profile.epsilons)))
        ratios[rate] = found
    assert max(ratios[RATE]) < 1 and min(ratios[RATE]) > 0.5, ratios
    assert min(ratios[2 * RATE]) > 1, ratios


def test_the_rate_bounds_are_clopper_pearson_and_the_statistic_is_the_likelihood_ratio():
    from scipy.stats import binomtest

    inside, outside = np.arange(100.0), np.arange(1000.0) - 900
    profile = claim_profile(noise_multiplier=SIGMA, sample_rate=RATE, steps=1, delta=DELTA)
    rates = bound_rates(inside=inside, outside=outside, profile=profile, rng=np.random.default_rng(0))
    # Recompute the held-out half's bounds with scipy's own exact (Clopper-Pearson) interval.
    rng = np.random.default_rng(0)
    eval_in = np.array_split(rng.permutation(inside), 2)[1]
    eval_out = np.array_split(rng.permutation(outside), 2)[1]
    tp, fp = int((eval_in >= rates.threshold).sum()), int((eval_out >= rates.threshold).sum())
    tpr = binomtest(tp, len(eval_in)).proportion_ci(confidence_level=0.95, method="exact").low
    fpr = binomtest(fp, len(eval_out)).proportion_ci(confidence_level=0.95, method="exact").high
    assert rates.tpr_low == pytest.approx(tpr) and rates.fpr_high == pytest.approx(fpr)
    assert rates.epsilon(DELTA) == pytest.approx(max(0.0, np.log((tpr - DELTA) / fpr)))
    scores = np.array([[0.3, -1.2], [2.0, 0.1]])
    expected = np.log(1 - RATE + RATE * np.exp((scores - 0.5) / SIGMA ** 2)).sum(axis=1)
    assert trial_statistic(scores, noise_multiplier=SIGMA, sample_rate=RATE) == pytest.approx(expected)


def test_the_trainer_calls_the_probe_at_every_step_and_leaves_the_model_unmoved():
    import torch

    from fedtune.client import mechanism_check
    from fedtune.client.trainer import train_locally
    from fedtune.common.privacy.plan import PrivacyPlan
    from fedtune.common.tasks import get_task

    model, lora_a = mechanism_check._stand_in_model()
    before = [p.detach().clone() for p in model.parameters()]
    dataset = mechanism_check._records(canaries=8)
    seen = {"start": 0, "backward": 0, "step": 0}

    class Counter:
        def start(self, loader, optimizer):
            seen["start"] += 1

        def after_backward(self, piece, optimizer):
            seen["backward"] += 1
            assert all(p.grad_sample.shape[0] == len(piece[0]) for p in optimizer.params)

        def after_step(self, optimizer):
            seen["step"] += 1
            assert all(p.grad is not None for p in lora_a)

    plan = PrivacyPlan(num_examples=len(dataset), sample_rate=0.25, steps_per_round=8, noise_multiplier=1.0,
                       planned_rounds=1, target_epsilon=10.0, target_delta=1e-5, accountant="prv")
    result = train_locally(model=model, dataset=dataset, loss=get_task("classification").loss, learning_rate=0.0,
                           batch_size=18, local_epochs=2, max_grad_norm=1.0, plan=plan, history=[], seed=0,
                           physical_batch_size=8, probe=Counter())
    assert result.steps == 8 and seen["start"] == 1 and seen["step"] == 8 and seen["backward"] >= 8
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_run_is_checked_with_its_clients_recorded_mechanism(tmp_path, monkeypatch):
    from fedtune.client import mechanism_check

    ledger = tmp_path / "ledgers" / "client-0"
    ledger.mkdir(parents=True)
    records = [{"status": "trained", "dp": True, "noise_multiplier": 0.9, "sample_rate": 0.06, "steps": 16,
                "delta": 1e-5, "policy": {"max-grad-norm": 0.4}},
               {"status": "refused-budget", "dp": True, "noise_multiplier": 0.9, "sample_rate": 0.06, "steps": 0,
                "delta": 1e-5}]
    (ledger / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.toml").write_text("max-grad-norm = 0.5\nphysical-batch-size = 8\n")  # the node caps C at 0.4
    called = {}
    monkeypatch.setattr(mechanism_check, "check_mechanism", lambda **kw: called.update(kw) or "checked")
    assert check_run(run_dir=tmp_path, client_id="client-0", trials=10, seed=3) == "checked"
    assert called == {"noise_multiplier": 0.9, "sample_rate": 0.06, "max_grad_norm": 0.4, "delta": 1e-5,
                      "steps": 1, "trials": 10, "physical_batch_size": 8, "seed": 3}
    with pytest.raises(FedtuneError, match="no ledger of a client"):
        check_run(run_dir=tmp_path, client_id="client-9")


def test_an_unknown_fault_or_a_mechanism_without_noise_is_refused():
    with pytest.raises(FedtuneError, match="unknown mechanism fault"):
        check_mechanism(noise_multiplier=1.0, sample_rate=0.1, max_grad_norm=1.0, delta=1e-5, fault="typo")
    with pytest.raises(FedtuneError, match="sigma > 0"):
        check_mechanism(noise_multiplier=0.0, sample_rate=0.1, max_grad_norm=1.0, delta=1e-5)


@pytest.mark.slow
def test_the_view_prints_the_claim_beside_the_bound_and_the_verdict(honest):
    from dataclasses import replace

    from rich.console import Console

    from fedtune.mechanism_view import print_mechanism_check

    for result, verdict in ((honest, "no finding"), (replace(honest, lower_epsilon=99.0), "FINDING")):
        buffer = io.StringIO()
        print_mechanism_check(result, Console(file=buffer, width=200))
        text = buffer.getvalue()
        assert verdict in text and f"{result.claim_epsilon:.3f}" in text and "Opacus PRV" in text
