"""`fedtune audit --report`: report.md and report.html with plots, written beside the run."""

from __future__ import annotations

import html
import json
from pathlib import Path

from common.ledger.audit import AuditResult
from common.storage import atomic_write


def write_report(*, result: AuditResult, out_dir: Path, test_metrics: tuple[str, ...]) -> list[Path]:
    """Write the plots and both reports into `out_dir`; returns the files written.

    `test_metrics` are the metrics.jsonl scores to plot when a run has them (each task's own).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_epsilon(plt, result, out_dir / "epsilon_per_round.png")]
    for metric in test_metrics:
        plot = _plot_test_metric(plt, out_dir / "metrics.jsonl", metric, out_dir / f"test_{metric}.png")
        if plot:
            written.append(plot)
    images = [p.name for p in written]
    written += [_markdown(result, images, out_dir / "report.md"), _html(result, images, out_dir / "report.html")]
    return written


def _plot_epsilon(plt, result: AuditResult, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    budgets = set()
    for client in sorted({r.client_id for r in result.rows}):
        rows = [r for r in result.rows if r.client_id == client and r.claimed_epsilon is not None]
        if rows:  # every client starts the run at epsilon 0
            ax.plot([0] + [r.round for r in rows], [0.0] + [r.claimed_epsilon for r in rows], marker="o",
                    label=client, alpha=0.8)
            budgets.update(r.target_epsilon for r in rows if r.target_epsilon is not None)
    for budget in sorted(budgets):
        ax.axhline(budget, color="red", linestyle="--", label=f"budget ε={budget:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (signed by the client)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Privacy spend per client")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_test_metric(plt, metrics_path: Path, metric: str, path: Path) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    if not metrics_path.is_file():
        return None
    rounds = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    points = [(r["round"], r[f"test_{metric}"]) for r in rounds if r.get(f"test_{metric}") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric}")
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Global adapter on the held-out test split")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _rows(result: AuditResult) -> list[list[str]]:
    def num(v, p=".4f"):
        return "-" if v is None else format(v, p)

    return [[r.client_id, str(r.round), r.status, str(r.steps), num(r.noise_multiplier), num(r.sample_rate),
             num(r.claimed_epsilon), num(r.recomputed_epsilon), num(r.target_epsilon, "g"),
             "ok" if not r.flags else ", ".join(r.flags)] for r in result.rows]


HEADER = ["client", "round", "status", "steps", "sigma", "q", "claimed ε", "recomputed ε", "budget", "check"]


def _findings(result: AuditResult) -> list[str]:
    return ([f"FAIL: {p}" for p in result.problems] + [f"OVER BUDGET: {b}" for b in result.budget_exceeded]
            + [f"POLICY: {b}" for b in result.policy_breaches]
            + [f"note: {n}" for n in result.notes])


def _markdown(result: AuditResult, images: list[str], path: Path) -> Path:
    lines = [f"# Privacy audit: {result.verdict}", "",
             f"Verdict: **{result.verdict}** (exit code {result.exit_code}). Epsilon recomputed from each "
             f"client's signed history with Google's dp_accounting PLD accountant.", ""]
    lines += [f"![{name}]({name})" for name in images] + [""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    lines += ["", "## Ledgers", ""]
    lines += [f"- {c.owner}: {c.records} records, key {c.key_fingerprint} "
              f"({'pinned' if c.key_pinned else 'beside ledger'}), "
              f"{'verifies' if not c.problems else str(len(c.problems)) + ' problem(s)'}" for c in result.ledgers]
    findings = _findings(result)
    lines += ["", "## Findings", ""] + ([f"- {f}" for f in findings] or ["- none"])
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def _html(result: AuditResult, images: list[str], path: Path) -> Path:
    esc = html.escape
    color = {0: "#1a7f37", 1: "#cf222e", 2: "#9a6700"}[result.exit_code]
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _rows(result))
    ledgers = "".join(f"<li>{esc(c.owner)}: {c.records} records, key {esc(c.key_fingerprint)}, "
                      f"{'verifies' if not c.problems else str(len(c.problems)) + ' problem(s)'}</li>"
                      for c in result.ledgers)
    findings = "".join(f"<li>{esc(f)}</li>" for f in _findings(result)) or "<li>none</li>"
    imgs = "".join(f'<p><img src="{esc(name)}" alt="{esc(name)}"></p>' for name in images)
    atomic_write(path, f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedtune privacy audit</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:right}}</style></head><body>
<h1>Privacy audit: <span style="color:{color}">{esc(result.verdict)}</span></h1>
<p>Exit code {result.exit_code}. Epsilon recomputed from each client's signed history with Google's
dp_accounting PLD accountant.</p>{imgs}
<table><tr>{head}</tr>{body}</table>
<h2>Ledgers</h2><ul>{ledgers}</ul><h2>Findings</h2><ul>{findings}</ul>
</body></html>
""")
    return path
