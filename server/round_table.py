"""A rich table that grows by one row as each round finishes (`fedtune simulate` and `flwr run`)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedtune.common.config import RunConfig
from fedtune.common.counts import counted
from fedtune.common.tasks import get_task
from fedtune.common.tasks.base import Task

NONE_TRAINED = "none trained"  # a DP round's epsilon cell when no client trained or reported a spend


def run_banner(config: RunConfig, *, run_dir: Path, verb: str = "Simulating") -> str:
    """The first line of a run: its size, its privacy (epsilon with its delta) and where it writes."""
    privacy = f"DP-SGD ε≤{config.target_epsilon:g} at δ={config.target_delta:g}" if config.dp else "no DP"
    return (f"{verb} {counted(config.num_clients, 'client')}, {counted(config.num_rounds, 'round')}, {privacy}, "
            f"{'SecAgg+' if config.secure_aggregation else 'plain FedAvg'} → {run_dir}")


def columns(task: Task, delta: float | None = None) -> tuple[str, ...]:
    """The table's header: the task's own two score columns between the common ones; the
    epsilon column names the delta it holds at (a DP run's)."""
    epsilon = "max ε" if delta is None else f"max ε (δ={delta:g})"
    return ("round", "trained", "train loss", *(header for header, _, _ in task.progress_columns), epsilon,
            "seconds")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def _epsilon_cell(epsilons: list[float], *, trained: int, dp: bool | None) -> str:
    """The largest epsilon reported; "no DP" only for a run known to be without DP, and a DP round
    where nobody trained and nobody reported a spend says so instead."""
    if epsilons:
        return format(max(epsilons), ".3f")
    if dp is False:
        return "no DP"
    return NONE_TRAINED if not trained else "-"


def round_row(record: dict, task: Task, *, dp: bool | None = None) -> tuple[str, ...]:
    """One row; `dp` the run's (None: unknown, the epsilon cell then never says "no DP")."""
    clients = record["clients"].values()
    losses = [c["train_loss"] for c in clients if c.get("train_loss") is not None]
    epsilons = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
    sampled = record.get("clients_sampled") or len(record["clients"])
    return (
        str(record["round"]),
        f"{record['clients_trained']}/{sampled}",
        _fmt(sum(losses) / len(losses) if losses else None, ".4f"),
        *(_fmt(record.get(key), pattern) for _, key, pattern in task.progress_columns),
        _epsilon_cell(epsilons, trained=record.get("clients_trained", 0), dp=dp),
        _fmt(record["seconds"], ".1f"),
    )


def log_console() -> Console:
    """The console when none is given (a ServerApp under `flwr run` or a deployment, a library
    caller): on a terminal rich's own; into a log or a pipe, lines are never wrapped (a wrapped line
    defeats grep) and tables are 120 columns, not 80, as `fedtune`'s own console does."""
    terminal = sys.stdout.isatty()
    return Console(width=None if terminal else 120, soft_wrap=not terminal)


class RoundTable:
    """Prints the header once, then one aligned row per finished round."""

    widths = (5, 7, 10)  # round, trained, train loss; then the task's columns, epsilon, seconds

    @classmethod
    def for_run(cls, config: RunConfig, console: Console | None = None) -> RoundTable:
        """The table of a run: its task's scores, and epsilon at the run's delta (a DP run's)."""
        return cls(get_task(config.task), console, delta=config.target_delta if config.dp else None, dp=config.dp)

    def __init__(self, task: Task, console: Console | None = None, *, delta: float | None = None,
                 dp: bool | None = None) -> None:
        self.task, self.delta, self.dp = task, delta, dp
        self.console = console or log_console()
        self.rows: list[tuple[str, ...]] = []

    def _table(self, *, header: bool, columns: tuple[str, ...]) -> Table:
        table = Table(show_header=header, box=None, pad_edge=False)
        scores = tuple(max(9, len(header) + 1) for header, _, _ in self.task.progress_columns)
        epsilon = max(7, len(columns[-2]), 0 if self.dp is False else len(NONE_TRAINED))
        widths = (*self.widths, *scores, epsilon, 7)
        for name, width in zip(columns, widths):
            table.add_column(name if header else "", justify="right", width=width, no_wrap=True)
        return table

    def add(self, record: dict) -> None:
        row = round_row(record, self.task, dp=self.dp)
        self.rows.append(row)
        table = self._table(header=len(self.rows) == 1, columns=columns(self.task, self.delta))
        table.add_row(*row)
        self.console.print(table)
        note = round_note(record)
        if note:
            self.console.print(f"[yellow]      round {record['round']}: {note}[/yellow]", highlight=False)


def round_note(record: dict) -> str:
    """What went wrong in a round, in words: missing clients, rejected updates, nothing applied, a
    model that predicts one class for every test example."""
    notes = []
    missing = (record.get("clients_sampled") or 0) - len(record["clients"])
    if missing > 0:
        notes.append(f"{missing} sampled client(s) did not answer")
    rejected = {cid: c["rejected"] for cid, c in record["clients"].items() if c.get("rejected")}
    notes += [f"rejected {cid}'s update: it {why}" for cid, why in sorted(rejected.items())]
    resent = sorted(cid for cid, c in record["clients"].items() if c.get("resent"))
    if resent:
        notes.append(f"re-sent after the resume (already paid for): {', '.join(resent)}")
    if not record.get("update_applied", True):
        notes.append(f"global adapter unchanged ({record.get('aggregation_failed') or 'no aggregate'})")
    if record.get("test_predicted_classes") == 1:
        notes.append("the model predicts a single class for every test example (macro-F1 counts every class: "
                     "more rounds or steps, a larger budget, or more records per client)")
    return "; ".join(notes)
