"""Privacy accounting shared by clients, `fedtune plan` and the auditor.

The accountant history is Opacus' own format: a list of (noise_multiplier, sample_rate,
steps) entries. It is composed over every round a client trained, so epsilon after round k
is the epsilon of one accountant fed the whole history, never a sum of fresh per-round ones.
`independent_epsilon` recomputes the same quantity with a second library (Google's
dp_accounting PLD accountant), which is what the audit trusts.
"""

from __future__ import annotations

import functools
import math
import warnings

HistoryEntry = tuple[float, float, int]


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
    if any(float(s) <= 0 for s, _, _ in history):
        return math.inf  # a round released without noise: no finite guarantee remains
    return _opacus_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), accountant)


# The PRV accountant discretizes the privacy loss on a grid whose points grow with the square root of
# the steps and with epsilon; at about 200 bytes a point, 12 million points peak near 2.5 GB (measured:
# 10.2 million, 2.0 GB). A history whose grid is larger lies far past any budget a node holds (sigma 1,
# q 0.1, 10,000 steps is epsilon 128; at the policy's 100,000-step cap a budget near 1 needs 8.7
# million points), so its epsilon counts as unbounded (a budget guard refuses it) instead of being
# computed until the machine runs out of memory.
MAX_PRV_POINTS = 12_000_000


class PRVGridTooLarge(ArithmeticError):
    """The PRV accountant would need more than MAX_PRV_POINTS grid points for this history."""


@functools.lru_cache(maxsize=256)
def _opacus_epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    """Cached: a plan's calibration ends on the very history its last round composes to."""
    from opacus.accountants import create_accountant  # loads torch: `fedtune audit` never needs it

    acc = _bounded_prv_class()() if accountant == "prv" else create_accountant(mechanism=accountant)
    acc.history = list(history)
    if accountant != "prv":
        return float(acc.get_epsilon(delta=delta))
    # PRV returns an upper bound within an absolute eps_error (0.01 by default): 2% of epsilon 0.5,
    # the size of a two-stage run's probe share. Below epsilon 1 it is recomputed ten times finer.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)  # q = 1: log(1 - q)
        warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)  # tiny sigma
        try:
            epsilon = float(acc.get_epsilon(delta=delta))
        except PRVGridTooLarge:
            return math.inf
        if epsilon >= 1.0:
            return epsilon
        try:
            return float(acc.get_epsilon(delta=delta, eps_error=0.001))
        except PRVGridTooLarge:
            return epsilon  # the coarser bound is an upper bound too


@functools.cache
def _bounded_prv_class():
    """Opacus' PRV accountant, refusing (before allocating it) a grid over MAX_PRV_POINTS."""
    from opacus.accountants import PRVAccountant

    class BoundedPRVAccountant(PRVAccountant):
        def _get_domain(self, *args, **kwargs):
            domain = super()._get_domain(*args, **kwargs)
            if domain.size > MAX_PRV_POINTS:
                raise PRVGridTooLarge(f"the PRV grid would need {domain.size} points")
            return domain

    return BoundedPRVAccountant


PRECISE_INTERVAL = 1e-4  # dp_accounting's default discretization of the privacy loss
QUICK_INTERVAL = 1e-3  # ten times faster; pessimistic like the default, so still an upper bound,
# and within 0.7% of it for sigma 0.4-2, q 0.01-0.5, 1-1000 steps (0.02% on the default run)


def independent_epsilon(history: list[HistoryEntry], delta: float, *, interval: float = PRECISE_INTERVAL) -> float:
    """Epsilon of a Poisson-subsampled Gaussian history by dp_accounting's PLD accountant,
    its privacy loss discretized to `interval` (pessimistically: an upper bound either way)."""
    if not history:
        return 0.0
    if any(float(s) <= 0 for s, _, _ in history):
        return math.inf
    return _pld_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), float(interval))


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(history: tuple[HistoryEntry, ...], delta: float, interval: float) -> float:
    """Cached: clients of one federation often share a history."""
    composed = None
    for sigma, rate, steps in history:  # what PLDAccountant composes for these events, step PLD built once
        part = _step_pld(sigma, rate, interval).self_compose(steps)
        composed = part if composed is None else composed.compose(part)
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=64)
def _step_pld(sigma: float, rate: float, interval: float):
    """One Poisson-subsampled Gaussian step; building it is most of the cost, and each of a
    client's rounds repeats it."""
    from dp_accounting.pld import privacy_loss_distribution  # heavy, and only the audit needs it

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=rate, value_discretization_interval=interval)
