"""`fedtune plan`'s output: the schedule a client will follow as a table, and as a plot."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_schedule(schedule: dict, console: Console) -> None:
    console.print(f"noise multiplier {schedule['noise_multiplier']:.6f}, sample rate "
                  f"{schedule['sample_rate']:.6f}, {schedule['steps_per_round']} DP steps per round "
                  f"({schedule['accountant']} accountant, delta {schedule['delta']:g})")
    table = Table()
    for column in ("round", "epsilon", "budget left"):
        table.add_column(column, justify="right")
    for row in schedule["rounds"]:
        table.add_row(str(row["round"]), f"{row['epsilon']:.4f}",
                      f"{schedule['target_epsilon'] - row['epsilon']:.4f}")
    console.print(table)


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
    ax.set_title(f"σ = {schedule['noise_multiplier']:.4f}, q = {schedule['sample_rate']:.4f}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
