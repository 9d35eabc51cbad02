"""The statistics of the mechanism check: canary scores in, an epsilon lower bound at 95% out.

The procedure is jax_privacy's `CanaryScoreAuditor.epsilon_clopper_pearson` with its `Split`
threshold strategy (Jagielski et al. 2020, Nasr et al. 2023), which cannot be installed here
without JAX: choose the decision threshold on one half of the trials, then bound the true and
false positive rates of the other half with Clopper-Pearson intervals (scipy.stats.beta), each
at 97.5%, so both hold together at 95%. Where they hold, the mechanism is not (eps, delta)-DP for
any eps below ln((TPR_low - delta) / FPR_high), for every delta at once; so the bound is set
against the accountant's whole privacy profile (dp_accounting's PLD), not one point of it, and
the run's delta, where a few hundred thousand trials cannot reach, is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
DELTA_CEILING = 1e-2  # the largest delta the bound is compared at: a larger one protects no one
CANDIDATES = 2000  # thresholds tried on the choosing half
CHOOSING_TAIL = 1e-3  # stricter bounds while choosing: no threshold wins on a handful of lucky counts


def trial_statistic(scores: np.ndarray, *, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Each trial's log-likelihood ratio, canary in against out, under the recorded mechanism.

    `scores` is (trials, steps): a step's noisy gradient at the canary's coordinate over C, which
    is N(1, sigma^2) in a step that sampled the canary and N(0, sigma^2) otherwise. The sum of
    log(1 - q + q exp((s - 1/2) / sigma^2)) is the most powerful test if the record is true.
    """
    sigma2, q = noise_multiplier ** 2, sample_rate
    log_out = math.log1p(-q) if q < 1 else -math.inf
    return np.logaddexp(log_out, math.log(q) + (scores - 0.5) / sigma2).sum(axis=1)


@dataclass(frozen=True)
class ClaimProfile:
    """The accountant's epsilon at each delta from the run's up to DELTA_CEILING."""

    deltas: tuple[float, ...]
    epsilons: tuple[float, ...]


def claim_profile(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> ClaimProfile:
    """dp_accounting's PLD accountant for `steps` Poisson-sampled Gaussian steps (its default,
    pessimistic discretisation), at a geometric grid of deltas, four a decade."""
    from dp_accounting import dp_event, pld

    accountant = pld.PLDAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), steps))
    top = max(delta, DELTA_CEILING)
    count = 1 + max(0, round(4 * math.log10(top / delta)))
    deltas = tuple(float(d) for d in np.geomspace(delta, top, count))
    return ClaimProfile(deltas=deltas, epsilons=tuple(float(accountant.get_epsilon(d)) for d in deltas))


@dataclass(frozen=True)
class RateBounds:
    """TPR and FPR of one threshold test on the evaluation half, bounded together at 95%."""

    threshold: float
    tpr_low: float
    fpr_high: float
    in_trials: int
    out_trials: int

    def epsilon(self, delta: float) -> float:
        """The lower bound on epsilon at `delta` these rates imply (0 when they imply none)."""
        return float(_epsilons(np.array([self.tpr_low]), np.array([self.fpr_high]), np.array([delta]))[0, 0])

    def gdp_epsilon(self, delta: float) -> float:
        """Nasr et al.'s extrapolation: the mu-GDP curve through these rates, read at `delta`.
        A heuristic: it assumes the trade-off curve is Gaussian-shaped, which a subsampled
        mechanism over few steps is not."""
        from dp_accounting import get_epsilon_gaussian
        from scipy.stats import norm

        mu = float(norm.isf(self.fpr_high) - norm.isf(self.tpr_low))
        return float(get_epsilon_gaussian(1 / mu, delta)) if mu > 0 else 0.0


def bound_rates(*, inside: np.ndarray, outside: np.ndarray, profile: ClaimProfile,
                rng: np.random.Generator) -> RateBounds:
    """Choose a threshold on a random half of each world's trials (the one that comes closest to
    the claim there), then bound its rates on the other half."""
    inside, outside = rng.permutation(inside), rng.permutation(outside)
    choose_in, eval_in = np.array_split(inside, 2)
    choose_out, eval_out = np.array_split(outside, 2)
    pooled = np.concatenate([choose_in, choose_out])
    levels = 1 - np.geomspace(1.0, 1 / len(pooled), CANDIDATES)  # dense in the upper tail, where eps is
    candidates = np.unique(np.quantile(pooled, levels))
    tpr, fpr = _rates(choose_in, choose_out, candidates, tail=CHOOSING_TAIL)
    ratio = _epsilons(tpr, fpr, np.array(profile.deltas)) / np.maximum(np.array(profile.epsilons), 1e-12)
    threshold = float(candidates[int(np.argmax(ratio.max(axis=1)))])
    tpr, fpr = _rates(eval_in, eval_out, np.array([threshold]), tail=(1 - CONFIDENCE) / 2)
    return RateBounds(threshold=threshold, tpr_low=float(tpr[0]), fpr_high=float(fpr[0]),
                      in_trials=len(eval_in), out_trials=len(eval_out))


def _rates(inside: np.ndarray, outside: np.ndarray, thresholds: np.ndarray, *,
           tail: float) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson TPR lower and FPR upper bounds of "score >= threshold means in", each
    wrong with probability `tail`."""
    from scipy.stats import beta

    tp = len(inside) - np.searchsorted(np.sort(inside), thresholds, side="left")
    fp = len(outside) - np.searchsorted(np.sort(outside), thresholds, side="left")
    tpr_low = np.where(tp > 0, beta.ppf(tail, np.maximum(tp, 1), len(inside) - tp + 1), 0.0)
    fpr_high = np.where(fp < len(outside), beta.ppf(1 - tail, fp + 1, np.maximum(len(outside) - fp, 1)), 1.0)
    return tpr_low, fpr_high


def _epsilons(tpr_low: np.ndarray, fpr_high: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """ln((TPR - delta) / FPR), floored at 0, for every (rate pair, delta): shape (pairs, deltas)."""
    gain = tpr_low[:, None] - deltas[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.log(np.maximum(gain, 1e-300)) - np.log(fpr_high[:, None])
    return np.where(gain > 0, np.maximum(value, 0.0), 0.0)
