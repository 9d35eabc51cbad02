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
    from opacus.accountants import create_accountant  # loads torch: `fedtune audit` never needs it

    if not history:
        return 0.0
    if any(float(s) <= 0 for s, _, _ in history):
        return math.inf  # a round released without noise: no finite guarantee remains
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def independent_epsilon(history: list[HistoryEntry], delta: float) -> float:
    """Epsilon of a Poisson-subsampled Gaussian history by dp_accounting's PLD accountant."""
    if not history:
        return 0.0
    if any(float(s) <= 0 for s, _, _ in history):
        return math.inf
    return _pld_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Cached: clients of one federation often share a history, and the PLD is seconds each."""
    from dp_accounting import dp_event, pld  # heavy, and only the audit needs it

    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
              for s, q, n in history]
    accountant = pld.PLDAccountant()
    accountant.compose(dp_event.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))
