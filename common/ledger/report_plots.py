"""The report's two plots: each client's epsilon over rounds, and the global adapter's test score.

Clients of an IID federation spend almost the same epsilon, so their curves lie on top of each
other: each gets its own colour, marker and line style, and its points are set slightly apart
(dodged) along the round axis, so every one stays visible; the legend sits outside the axes. The score plot starts at round 0 (the base adapter) when the run
recorded it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.common.ledger.audit import AuditResult

STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P"),
          ((0, (3, 2, 1, 2, 1, 2)), "X"), ("-", "*")]  # line style, marker; colours from the tab10 cycle
DPI = 110


def plot_all(*, result: AuditResult, run_dir: Path | None, out_dir: Path, metrics: tuple[str, ...],
             initial: dict[str, float]) -> list[Path]:
    """Write the plots into `out_dir`; the score plots only for metrics the run recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_plot_epsilon(plt, result, out_dir / "epsilon_per_round.png")]
    for metric in metrics:
        points = _metric_points(run_dir / "metrics.jsonl", metric, initial.get(metric)) if run_dir else []
        if points:
            written.append(_plot_metric(plt, points, metric, out_dir / f"test_{metric}.png"))
    return written


def _plot_epsilon(plt, result: AuditResult, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.2))
    budgets = set()
    colours = plt.get_cmap("tab10").colors
    clients = sorted({r.client_id for r in result.rows}, key=_natural)
    for index, client in enumerate(clients):
        rows = [r for r in result.rows if r.client_id == client and r.claimed_epsilon is not None]
        if rows:  # every client starts the run at epsilon 0
            line, marker = STYLES[index % len(STYLES)]
            dodge = (index - (len(clients) - 1) / 2) * min(0.06, 0.5 / len(clients))  # equal spends side by side
            ax.plot([dodge] + [r.round + dodge for r in rows], [0.0] + [r.claimed_epsilon for r in rows],
                    label=client.replace("$", r"\$"),  # a client id is text, not matplotlib math
                    color=colours[index % len(colours)], linestyle=line, marker=marker, markersize=7 - index % 3,
                    linewidth=1.8, markerfacecolor="none" if index % 2 else None)
            budgets.update(r.target_epsilon for r in rows if r.target_epsilon is not None)
    for budget in sorted(budgets):
        ax.axhline(budget, color="#cf222e", linestyle="--", linewidth=1.2, label=f"budget ε={budget:g}")
    ax.set_xlabel("round (clients' points set slightly apart where their spends are equal)")
    ax.set_ylabel("cumulative ε (signed by the client)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Privacy spend per client")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="medium", frameon=False)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _metric_points(metrics_path: Path, metric: str, initial: float | None) -> list[tuple[int, float]]:
    try:
        rounds = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    points = [(r["round"], r[f"test_{metric}"]) for r in rounds
              if isinstance(r, dict) and isinstance(r.get(f"test_{metric}"), (int, float))
              and isinstance(r.get("round"), int)]
    if points and initial is not None and all(p[0] != 0 for p in points):
        points.insert(0, (0, float(initial)))
    return points


def _plot_metric(plt, points: list[tuple[int, float]], metric: str, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1.8, color="#0969da",
            label=f"test {metric}")
    for x, y in points:
        ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize="small")
    ax.set_xlabel("round (0: the base model before any federated round)" if points[0][0] == 0 else "round")
    ax.set_ylabel(f"test {metric}")
    if metric == "accuracy":
        ax.set_ylim(0, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Global adapter on the held-out test split")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _natural(name: str) -> tuple:
    """client-2 before client-10."""
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, -1)
