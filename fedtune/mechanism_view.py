"""The terminal view of a mechanism check: the accountant's claim beside the measured bound."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the check itself loads torch; printing its result need not
    from fedtune.client.mechanism_check import MechanismCheck


def print_mechanism_check(result: MechanismCheck, console: Console) -> None:
    """What was run, the claims and the bounds side by side, then the verdict."""
    rates = result.rates
    console.print(f"Mechanism check: the client's DP-SGD step (Opacus) with sigma {result.noise_multiplier:g}, "
                  f"sample rate {result.sample_rate:.4g}, clipping bound {result.max_grad_norm:g}; "
                  f"{result.dp_steps} noisy steps cut into {result.in_trials:,} canary-in and "
                  f"{result.out_trials:,} canary-out trials of {result.steps} step(s) "
                  f"in {result.seconds:.0f} s", soft_wrap=True)
    table = Table(title=f"epsilon of {result.steps} step(s): claimed, and measured from below at "
                        f"{result.confidence:.0%} confidence")
    for column in ("delta", "claimed ε (Opacus PRV)", "claimed ε (dp_accounting PLD)", "measured ε ≥",
                   "measured / claimed"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.delta:.0e} (the run's)", f"{result.claim_epsilon:.3f}", f"{result.claim_epsilon_pld:.3f}",
                  f"{result.lower_epsilon:.3f}", _ratio(result.lower_epsilon, result.claim_epsilon_pld))
    if result.tightest_delta != result.delta:
        table.add_row(f"{result.tightest_delta:.0e} (closest)", "-", f"{result.tightest_claim:.3f}",
                      f"{result.tightest_lower:.3f}", _ratio(result.tightest_lower, result.tightest_claim))
    console.print(table)
    console.print(f"  test: canary in when its trial's likelihood ratio >= {rates.threshold:.3g}; on the held-out "
                  f"half TPR >= {rates.tpr_low:.4g}, FPR <= {rates.fpr_high:.3g} (Clopper-Pearson, together "
                  f"{result.confidence:.0%})", soft_wrap=True)
    console.print(f"  seen in the steps: noise {result.measured_sigma:.3f} C on canary-out entries (recorded sigma "
                  f"{result.noise_multiplier:g}); mean canary-in entry {result.measured_rate:.4f} C (q "
                  f"{result.sample_rate:.4g} with each canary clipped to C)", soft_wrap=True)
    console.print(f"  [dim]heuristic, not part of the verdict: the Gaussian-shaped extrapolation of Nasr et al. "
                  f"gives ε ≥ {result.gdp_epsilon:.3f} at delta {result.delta:.0e}[/dim]", soft_wrap=True)
    if result.fault:
        console.print(f"  [yellow]injected fault: {result.fault}[/yellow]")
    if result.finding:
        console.print("[bold red]FINDING[/bold red]: the measured lower bound exceeds the accountant's claim; "
                      "the noise, the clipping or the sampling is not what the ledger records", soft_wrap=True)
    else:
        console.print("[bold green]no finding[/bold green]: the measured bound stays under the claim",
                      soft_wrap=True)


def _ratio(lower: float, claim: float) -> str:
    return f"{lower / claim:.2f}x" if claim > 0 else "-"
