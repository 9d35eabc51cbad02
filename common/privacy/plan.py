"""A client's DP-SGD plan: sample rate, steps and the noise multiplier for the whole run,
calibrated once before the first round, and the epsilon schedule it leads to (`fedtune plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import FedtuneError
from common.privacy.accounting import HistoryEntry, compose, epsilon_of
from common.privacy.calibration import UnreachableBudget, calibrate_sigma


@dataclass(frozen=True)
class PrivacyPlan:
    """One client's DP-SGD schedule, fixed before its first round for the whole run."""

    num_examples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    planned_rounds: int
    target_epsilon: float
    target_delta: float
    accountant: str

    def round_entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def sampling_schedule(*, num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson sample rate q, DP steps per round) for N examples: what the accountant assumes."""
    sample_rate = min(1.0, batch_size / num_examples)
    return sample_rate, local_epochs * int(1 / sample_rate)


def plan_privacy(*, num_examples: int, batch_size: int, local_epochs: int, num_rounds: int,
                 target_epsilon: float, target_delta: float, accountant: str = "prv",
                 noise_multiplier: float = 0.0) -> PrivacyPlan:
    """Sample rate, steps per round and the noise multiplier for the whole planned run.

    Sample rate q = batch / N (Poisson sampling); a local epoch is int(1/q) steps, which is
    what Opacus' Poisson sampler draws. With `noise_multiplier` 0, sigma is calibrated so that
    `num_rounds` rounds spend at most `target_epsilon` at `target_delta`.
    """
    if num_examples < 1:
        raise FedtuneError("a client needs at least one training example for DP-SGD")
    sample_rate, steps_per_round = sampling_schedule(num_examples=num_examples, batch_size=batch_size,
                                                     local_epochs=local_epochs)
    if noise_multiplier <= 0:
        steps = num_rounds * steps_per_round
        try:
            noise_multiplier = calibrate_sigma(
                lambda sigma: epsilon_of([(sigma, sample_rate, steps)], delta=target_delta, accountant=accountant),
                target_epsilon=target_epsilon, tolerance=0.01)
        except UnreachableBudget as exc:
            raise FedtuneError(f"cannot reach epsilon {target_epsilon} at delta {target_delta} with "
                               f"{num_rounds} rounds of {steps_per_round} steps: {exc} "
                               f"Raise target-epsilon or lower num-rounds/local-epochs") from None
    return PrivacyPlan(num_examples=num_examples, sample_rate=sample_rate,
                       steps_per_round=steps_per_round, noise_multiplier=float(noise_multiplier),
                       planned_rounds=num_rounds, target_epsilon=target_epsilon,
                       target_delta=target_delta, accountant=accountant)


def epsilon_after_next_round(history: list[HistoryEntry], plan: PrivacyPlan) -> float:
    return epsilon_of(compose(history, plan.round_entry()), delta=plan.target_delta,
                      accountant=plan.accountant)


def fits_budget(epsilon: float, plan: PrivacyPlan) -> bool:
    """The guard's test; the tiny slack absorbs the accountant's float noise, nothing more."""
    return math.isfinite(epsilon) and epsilon <= plan.target_epsilon * (1 + 1e-9)


def privacy_schedule(*, dataset_size: int, batch_size: int, local_epochs: int, rounds: int,
                     target_epsilon: float, delta: float, accountant: str = "prv",
                     noise_multiplier: float = 0.0) -> dict:
    """Noise multiplier and epsilon after each round, via the same plan, composition and budget
    guard as a client (a round the guard would refuse is marked)."""
    plan = plan_privacy(num_examples=dataset_size, batch_size=batch_size, local_epochs=local_epochs,
                        num_rounds=rounds, target_epsilon=target_epsilon, target_delta=delta,
                        accountant=accountant, noise_multiplier=noise_multiplier)
    history, per_round = [], []
    for server_round in range(1, rounds + 1):
        history = compose(history, plan.round_entry())
        epsilon = epsilon_of(history, delta=delta, accountant=accountant)
        per_round.append({"round": server_round, "epsilon": epsilon,
                          "client_refuses": not fits_budget(epsilon, plan)})  # the client's own guard
    return {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "steps_per_round": plan.steps_per_round, "accountant": accountant, "delta": delta,
            "target_epsilon": target_epsilon, "rounds": per_round}
