"""DP-SGD planning and accounting shared by clients, `fedtune plan` and the auditor.

The accountant history is Opacus' own format: a list of (noise_multiplier, sample_rate,
steps) entries. It is composed over every round a client trained, so epsilon after round k
is the epsilon of one accountant fed the whole history, never a sum of fresh per-round ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.errors import FedtuneError

HistoryEntry = tuple[float, float, int]


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
    sample_rate = min(1.0, batch_size / num_examples)
    steps_per_round = local_epochs * int(1 / sample_rate)
    if noise_multiplier <= 0:
        try:
            noise_multiplier = get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
                steps=num_rounds * steps_per_round, accountant=accountant, epsilon_tolerance=0.01)
        except ValueError as exc:
            raise FedtuneError(f"cannot reach epsilon {target_epsilon} at delta {target_delta} with "
                               f"{num_rounds} rounds of {steps_per_round} steps: {exc} "
                               f"Raise target-epsilon or lower num-rounds/local-epochs") from None
    return PrivacyPlan(num_examples=num_examples, sample_rate=sample_rate,
                       steps_per_round=steps_per_round, noise_multiplier=float(noise_multiplier),
                       planned_rounds=num_rounds, target_epsilon=target_epsilon,
                       target_delta=target_delta, accountant=accountant)


def compose(history: list[HistoryEntry], entry: HistoryEntry) -> list[HistoryEntry]:
    """History with one more round, merged like Opacus' accountants merge repeated steps."""
    merged = [tuple(h) for h in history]
    if merged and merged[-1][0] == entry[0] and merged[-1][1] == entry[1]:
        sigma, rate, steps = merged.pop()
        merged.append((sigma, rate, int(steps) + int(entry[2])))
    else:
        merged.append((float(entry[0]), float(entry[1]), int(entry[2])))
    return merged  # type: ignore[return-value]


def epsilon_of(history: list[HistoryEntry], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by everything in `history`, from one Opacus accountant fed all of it."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def epsilon_after_next_round(history: list[HistoryEntry], plan: PrivacyPlan) -> float:
    return epsilon_of(compose(history, plan.round_entry()), delta=plan.target_delta,
                      accountant=plan.accountant)


def fits_budget(epsilon: float, plan: PrivacyPlan) -> bool:
    """The guard's test; the tiny slack absorbs the accountant's float noise, nothing more."""
    return math.isfinite(epsilon) and epsilon <= plan.target_epsilon * (1 + 1e-9)


def private_generator() -> torch.Generator:
    """A generator for DP noise and Poisson sampling that no other party can predict.

    Seeded with 64 bits from the operating system, per client, per round; never from the run
    seed (a shared seed would make every client draw the same noise and the same batches).
    """
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator
