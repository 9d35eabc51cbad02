"""Calibrating the noise multiplier: the smallest-enough sigma for a budget, in few accountant calls.

Opacus' `get_noise_multiplier` bisects sigma from [0, 20] until epsilon is within a tolerance
below the target: about 14 calls of the accountant (a PRV call is about 0.25 s), which every
client, the simulation's preflight and `fedtune plan` pay. Epsilon falls smoothly with sigma and
log-epsilon is close to linear in log-sigma, so interpolating in log-log space brackets and then
lands inside the tolerance window in 3 to 6 calls. The contract is Opacus': the sigma returned
spends at most the target, and no more than `tolerance` less; every candidate is judged by the
same Opacus accountant a client uses, never by the interpolation.
"""

from __future__ import annotations

import math
from typing import Callable

MAX_SIGMA = 1e6  # as Opacus: beyond this the target is unreachable for practical purposes
MIN_SIGMA = 1e-3
MAX_CALLS = 60


class UnreachableBudget(ValueError):
    """No noise multiplier up to MAX_SIGMA meets the target."""


def calibrate_sigma(epsilon_at: Callable[[float], float], *, target_epsilon: float,
                    tolerance: float = 0.01) -> float:
    """sigma with target - tolerance <= epsilon_at(sigma) <= target (the least noise found that fits).

    `epsilon_at` must be non-increasing in sigma; a non-finite or failing value counts as "too
    little noise".
    """
    def spend(sigma: float) -> float:
        try:
            value = float(epsilon_at(sigma))
        except (ValueError, OverflowError, ZeroDivisionError, FloatingPointError):
            return math.inf
        return value if math.isfinite(value) else math.inf

    low, high = _bracket(spend, target_epsilon)  # spend(low[0]) > target >= spend(high[0])
    for _ in range(MAX_CALLS):
        if high[1] >= target_epsilon - tolerance or low[0] is None:
            return high[0]
        sigma = _next_guess(low, high, aim=target_epsilon - tolerance / 2)
        epsilon = spend(sigma)
        if epsilon <= target_epsilon:
            high = (sigma, epsilon)
        else:
            low = (sigma, epsilon)
    return high[0]  # fits the budget, only more noise than needed


def _bracket(spend: Callable[[float], float], target: float) -> tuple[tuple, tuple]:
    """(low, high): (sigma, epsilon) pairs on each side of the target, found from sigma 1 by doubling."""
    sigma, epsilon = 1.0, spend(1.0)
    if epsilon > target:
        low = (sigma, epsilon)
        while epsilon > target:
            if sigma > MAX_SIGMA:
                raise UnreachableBudget(f"no noise multiplier up to {MAX_SIGMA:g} spends at most "
                                        f"epsilon {target:g}.")
            low = (sigma, epsilon)
            sigma, epsilon = sigma * 2, spend(sigma * 2)
        return low, (sigma, epsilon)
    high = (sigma, epsilon)
    while epsilon <= target:
        if sigma < MIN_SIGMA:
            return (None, math.inf), (sigma, epsilon)  # almost no noise already fits
        high = (sigma, epsilon)
        sigma, epsilon = sigma / 2, spend(sigma / 2)
    return (sigma, epsilon), high


def _next_guess(low: tuple, high: tuple, *, aim: float) -> float:
    """Interpolate log-sigma at which log-epsilon hits `aim`, kept inside the bracket (bisect if not)."""
    (s_low, e_low), (s_high, e_high) = low, high
    middle = math.sqrt(s_low * s_high)
    if not (math.isfinite(e_low) and e_low > 0 and e_high > 0):
        return middle
    slope = (math.log(e_high) - math.log(e_low)) / (math.log(s_high) - math.log(s_low))
    if slope >= 0:
        return middle
    guess = math.exp(math.log(s_low) + (math.log(aim) - math.log(e_low)) / slope)
    span = s_high - s_low
    if not s_low + 0.02 * span < guess < s_high - 0.02 * span:  # too close to an end: it would crawl
        return middle
    return guess
