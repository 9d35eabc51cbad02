"""The audit's own recomputation of a client's epsilon, in time and memory bounded here, not by
what a ledger claims.

The audit recomputes every round's epsilon with Google's dp_accounting PLD accountant (not Opacus).
A PLD's size grows with the steps it composes, and faster with a small sigma or a large q: one
re-signed record claiming 10^9 steps needs about 800 million points and grows until the machine
kills the auditor. So a history is composed one record at a time (each row's epsilon costs one
composition, not the whole history again), and before each composition the exact size it would
have is computed from dp_accounting's own truncation bound; a history past any bound below is not
recomputed: the audit reports it as a check it could not make (exit 1) instead of computing.

The bounds, per client ledger (measured on this machine's CPU, PLD at the quick discretization):
- MAX_AUDITED_STEPS = 1,000,000 DP steps composed: ten runs at the node policy's default cap of
  100,000 DP steps per run (common/privacy/plan.py), for a ledger kept across runs;
- MAX_AUDITED_RECORDS = 10,000 trained records: ten runs at the node policy's 1,000-round cap;
- MAX_MECHANISMS = 100 distinct (sigma, q) pairs (an honest run has one per stage): each is a PLD
  built in up to half a second;
- MAX_PLD_POINTS = 4,000,000 points in the composed PLD (about 400 MB at its peak; sigma 1,
  q 0.06 and 10^6 steps need 1.3 million), and MAX_PLD_WORK = 400 million points composed in all
  (each row's composition costs about its size: a few minutes at most).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from fedtune.common.privacy.accounting import PRECISE_INTERVAL, QUICK_INTERVAL, HistoryEntry

MAX_AUDITED_STEPS = 1_000_000
MAX_AUDITED_RECORDS = 10_000
MAX_MECHANISMS = 100
MAX_PLD_POINTS = 4_000_000
MAX_PLD_WORK = 400_000_000
TAIL_MASS = 1e-15  # dp_accounting's default truncation in self_compose
_Z = 10.0  # standard deviations of the Gaussian's loss a one-step PLD spans (an upper bound on its width)


class TooLarge(Exception):
    """The history is past one of the bounds above; the message says which (never a data value)."""


@functools.lru_cache(maxsize=MAX_MECHANISMS)
def _step_pld(sigma: float, rate: float, interval: float):
    from dp_accounting.pld import privacy_loss_distribution  # heavy, and only the audit needs it

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=rate, value_discretization_interval=interval)


def _one_step_points(sigma: float, interval: float) -> float:
    """An upper bound on a one-step PLD's points: the Gaussian's privacy loss 1/(2 sigma^2) +- Z/sigma
    (subsampling only narrows it), before it is built."""
    return (0.5 / sigma ** 2 + _Z / sigma) / interval


def _composed_points(step, steps: int) -> int:
    """The exact number of points self_compose(steps) allocates: dp_accounting's own truncation bound,
    computed before composing. Both directions of a non-symmetric PLD count."""
    from dp_accounting.pld import common

    total = 0
    for pmf in (getattr(step, "_pmf_remove", None), getattr(step, "_pmf_add", None)):
        probs = getattr(pmf, "_probs", None)
        if probs is None:
            continue
        lower, upper = common.compute_self_convolve_bounds(probs, steps, TAIL_MASS)
        total += max(upper - lower + 1, len(probs))
        if getattr(step, "_symmetric", False):
            break
    return total


@dataclass
class Recomputation:
    """One client's history composed record by record at one discretization."""

    interval: float
    entries: list[HistoryEntry] = field(default_factory=list)
    composed: object = None
    composed_upto: int = 0
    points: int = 0
    work: int = 0
    infinite: bool = False
    mechanisms: set = field(default_factory=set)

    def epsilon(self, history: list[HistoryEntry], delta: float) -> float:
        """Epsilon of `history` (which extends what was composed before), or TooLarge."""
        for sigma, rate, steps in history[self.composed_upto:]:
            self._compose(float(sigma), float(rate), int(steps))
            self.composed_upto += 1
        if self.infinite:
            return math.inf
        if self.composed is None:
            return 0.0
        return float(self.composed.get_epsilon_for_delta(delta))

    def _compose(self, sigma: float, rate: float, steps: int) -> None:
        if sigma <= 0:  # a round without DP: epsilon is infinite from here on, nothing to compute
            self.infinite = True
            return
        if self.infinite:
            return
        if not (0 < rate <= 1) or steps < 1:
            raise TooLarge("a recorded sample rate outside (0, 1] or fewer than 1 step")
        if _one_step_points(sigma, self.interval) > MAX_PLD_POINTS:
            raise TooLarge(f"a noise multiplier too small to recompute within {MAX_PLD_POINTS:,} PLD points")
        if (sigma, rate) not in self.mechanisms and len(self.mechanisms) >= MAX_MECHANISMS:
            raise TooLarge(f"more than {MAX_MECHANISMS} distinct (sigma, q) pairs")
        self.mechanisms.add((sigma, rate))
        step = _step_pld(sigma, rate, self.interval)
        points = _composed_points(step, steps)
        if self.points + points > MAX_PLD_POINTS:
            raise TooLarge(f"a privacy loss distribution of over {MAX_PLD_POINTS:,} points")
        if self.work + self.points + points > MAX_PLD_WORK:
            raise TooLarge(f"over {MAX_PLD_WORK:,} PLD points composed in all")
        part = step.self_compose(steps)
        self.composed = part if self.composed is None else self.composed.compose(part)
        self.points += points
        self.work += self.points


def history_bound_problem(history: list[HistoryEntry]) -> str | None:
    """Why the audit will not recompute `history` (its totals past the bounds), or None."""
    steps = sum(int(n) for s, _, n in history if float(s) > 0)
    if len(history) > MAX_AUDITED_RECORDS:
        return f"more than {MAX_AUDITED_RECORDS:,} trained records"
    if steps > MAX_AUDITED_STEPS:
        return f"more than {MAX_AUDITED_STEPS:,} DP steps in all"
    return None


@dataclass
class ClientRecomputation:
    """Quick (every row) and precise (only to confirm a finding) recomputations of one client."""

    quick: Recomputation = field(default_factory=lambda: Recomputation(interval=QUICK_INTERVAL))
    precise: Recomputation = field(default_factory=lambda: Recomputation(interval=PRECISE_INTERVAL))

    def quick_epsilon(self, history: list[HistoryEntry], delta: float) -> float:
        problem = history_bound_problem(history)
        if problem:
            raise TooLarge(problem)
        return self.quick.epsilon(history, delta)

    def precise_epsilon(self, history: list[HistoryEntry], delta: float) -> float:
        return self.precise.epsilon(history, delta)
