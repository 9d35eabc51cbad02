"""`fedtune plan`: the schedule a client will follow, as a table or JSON, and as a plot.

Everything cheap is checked first (the config's own checks, the node policy's default caps on
rounds and DP steps, delta against 1/N, the plot's folder), so a mistake is answered before Opacus
and torch load for the accountant, and a plan no node would calibrate is never computed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedtune.common.counts import counted, rounds_from_1
from fedtune.common.errors import FedtuneError


@dataclass(frozen=True)
class PlanRequest:
    target_epsilon: float
    delta: float
    dataset_size: int
    batch_size: int
    local_epochs: int
    rounds: int
    accountant: str
    noise_multiplier: float
    allow_large_delta: bool
    mode: str = "adapter"  # the CLI passes "" when --mode is unset: check_request resolves it as a run would
    probe_rounds: int = 1
    probe_steps: int = 16
    probe_share: float = 0.5


def check_request(request: PlanRequest, plot: Path | None) -> PlanRequest:
    """The run config's validation and messages, the node's delta rule, and the plot's folder.
    Returns the request with its mode resolved as a run's is (an unset mode: the budget's default)."""
    from fedtune.common.config import RunConfig

    if request.dataset_size < 1:
        raise FedtuneError("--dataset-size must be at least 1 (the client's number of training examples)")
    config = RunConfig(target_epsilon=request.target_epsilon, target_delta=request.delta,
                       batch_size=request.batch_size, local_epochs=request.local_epochs, num_rounds=request.rounds,
                       accountant=request.accountant, noise_multiplier=request.noise_multiplier,
                       secure_aggregation=False, num_clients=1, clients_per_round=1, training_mode=request.mode,
                       probe_rounds=request.probe_rounds, probe_steps=request.probe_steps,
                       probe_epsilon_share=request.probe_share)
    _check_size(config, dataset_size=request.dataset_size)
    from fedtune.common.privacy.policy import NodePolicy

    if NodePolicy(allow_large_delta=request.allow_large_delta).delta_problem(delta=request.delta,
                                                                            num_examples=request.dataset_size):
        raise FedtuneError(f"--delta {request.delta:g} is not below 1/{request.dataset_size} (1/dataset-size): it "
                           f"would permit releasing a whole record; lower it (e.g. 1e-5), or pass "
                           f"--allow-large-delta if the client sets such a target-delta itself")
    if plot is not None and not plot.parent.is_dir():
        raise FedtuneError(f"--plot: folder {plot.parent} does not exist; create it or choose another path")
    return dataclasses.replace(request, mode=config.training_mode)


def _check_size(config, *, dataset_size: int) -> None:
    """A plan over the default node caps would be refused by a client before it calibrates; it is
    refused here too, by the same rule, before the accountant's time and memory are spent."""
    from fedtune.common.privacy.plan import size_problem

    problem = size_problem(config, num_examples=dataset_size, party="a node by default")
    if problem:
        raise FedtuneError(f"{problem} (here: --rounds, --local-epochs, --probe-steps, --batch-size)")


def load_accountants_without_torch() -> None:
    """Import Opacus' accountants (numpy and scipy) without Opacus' package, which loads torch.

    `fedtune plan` needs only the accountants, and torch alone is most of a 2-second answer. The
    accountant code that runs is Opacus' own; only its package `__init__` (the trainer's torch
    parts) and the `DPOptimizer` its type hints name are stood in. Call this only in a process
    that will never train: a later `import opacus` there would find the stand-in.
    """
    import importlib.util
    import sys
    import types

    if "opacus" in sys.modules:
        return
    spec = importlib.util.find_spec("opacus")
    package = types.ModuleType("opacus")
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    optimizers = types.ModuleType("opacus.optimizers")
    optimizers.DPOptimizer = object  # only a type annotation in opacus/accountants/accountant.py
    sys.modules.update({"opacus": package, "opacus.optimizers": optimizers})
    importlib.import_module("opacus.accountants")  # now loads without torch


def schedule_of(request: PlanRequest) -> dict:
    """The schedule, with each round a client's budget guard would refuse marked."""
    from fedtune.common.privacy.plan import privacy_schedule  # the accountants load only once the input is valid

    return privacy_schedule(dataset_size=request.dataset_size, batch_size=request.batch_size,
                            local_epochs=request.local_epochs, rounds=request.rounds,
                            target_epsilon=request.target_epsilon, delta=request.delta,
                            accountant=request.accountant, noise_multiplier=request.noise_multiplier,
                            training_mode=request.mode, probe_rounds=request.probe_rounds,
                            probe_steps=request.probe_steps, probe_share=request.probe_share)


def over_budget_warning(schedule: dict) -> str | None:
    refused = [row for row in schedule["rounds"] if row["client_refuses"]]
    if not refused:
        return None
    first = refused[0]
    return (f"round {first['round']} would spend epsilon {first['epsilon']:.4f}, "
            f"{first['epsilon'] - schedule['target_epsilon']:.4f} over the budget {schedule['target_epsilon']:g}: "
            f"clients refuse round{'s' if len(refused) > 1 else ''} {', '.join(str(r['round']) for r in refused)}. "
            f"Raise --noise-multiplier (0 calibrates it), or lower --rounds/--local-epochs")


def print_schedule(schedule: dict, console: Console) -> None:
    probe = schedule.get("probe")
    stages = (f"{rounds_from_1(probe['rounds'], kind='probe round')}: noise multiplier {probe['noise_multiplier']:.6f}, full batch, "
              f"{counted(probe['steps_per_round'], 'step')} per round; then " if probe else "")
    console.print(f"{schedule['training_mode']}: {stages}noise multiplier {schedule['noise_multiplier']:.6f}, "
                  f"sample rate {schedule['sample_rate']:.6f}, {schedule['steps_per_round']} DP steps per round "
                  f"({schedule['accountant']} accountant); budget epsilon {schedule['target_epsilon']:g} "
                  f"at delta {schedule['delta']:g}", highlight=False)
    table = Table()
    for column in ("round", "stage", "epsilon", "delta", "budget left", "client"):
        table.add_column(column, justify="right")
    for row in schedule["rounds"]:
        table.add_row(str(row["round"]), row.get("stage", "adapter"), f"{row['epsilon']:.4f}", f"{schedule['delta']:g}",
                      f"{schedule['target_epsilon'] - row['epsilon']:.4f}",
                      "[red]refuses[/red]" if row["client_refuses"] else "trains")
    console.print(table)


def print_json(schedule: dict) -> None:
    print(json.dumps(schedule, indent=2))


def plot_schedule(schedule: dict, path: Path) -> None:
    import matplotlib  # heavy: only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = schedule["rounds"]
    ax.plot([r["round"] for r in rounds], [r["epsilon"] for r in rounds], marker="o", label="planned ε")
    ax.axhline(schedule["target_epsilon"], color="red", linestyle="--", label="budget")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε")
    ax.set_title(f"σ = {schedule['noise_multiplier']:.4f}, q = {schedule['sample_rate']:.4f}, "
                 f"δ = {schedule['delta']:g}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
