"""What a classification run trains, chosen from its privacy budget when the config does not say.

Measured on BBC News, 5 clients, 3 rounds, 3 seeds (BENCHMARKS.md, "Utility"; `make bench`):
private linear probing (`probe`: the head alone over the model's frozen, pooled features) noises 20x
fewer coordinates than FFA-LoRA and beats it at every budget. At the default max-length 128 it
also matches two-stage at epsilon 1 and 3 (within the spread) at a third of the time a round, so
it is the choice at every budget; the step sizes were chosen on validation splits
(benchmarks/probe_tuning.py). The README's table shows these rows (a test checks they agree); a
key set in the config always wins over them.
"""

from __future__ import annotations

from typing import Any

from fedtune.common import training_modes

TRAINING_MODES = tuple(training_modes.TRAINING_MODES)  # the names a config may give (common/training_modes.py)
# (largest target epsilon, what to train). No DP counts as an infinite budget.
BUDGET_DEFAULTS: tuple[tuple[float, dict[str, Any]], ...] = (
    (1.0, {"training_mode": "probe", "probe_learning_rate": 2.0}),
    (float("inf"), {"training_mode": "probe", "probe_learning_rate": 5.0}),
)


def defaults_for_budget(*, dp: bool, target_epsilon: float) -> dict[str, Any]:
    """The measured choice for this budget (the smallest row whose epsilon covers it)."""
    epsilon = target_epsilon if dp else float("inf")
    for ceiling, values in BUDGET_DEFAULTS:
        if epsilon <= ceiling:
            return dict(values)
    return dict(BUDGET_DEFAULTS[-1][1])
