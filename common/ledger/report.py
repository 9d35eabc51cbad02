"""`fedtune audit --report`: report.md and report.html, the privacy report an officer signs.

It states, per client, the guarantee (epsilon, delta, unit of privacy) and the mechanism behind
it (C, sigma, q, steps), which accountant signed it and which re-checked it, next to the run's
id and dates, the fedtune version and the data sizes; then the audit's verdict, saying whether
the keys were pinned. The HTML embeds its plots, so it survives being mailed. It is written
beside the run, or into `out_dir` (a read-only archive can be reported on).
"""

from __future__ import annotations

from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.audit import AuditResult
from fedtune.common.ledger.report_facts import RunFacts, gather_facts
from fedtune.common.ledger.report_html import render_html
from fedtune.common.ledger.report_tables import (GUARANTEE_HEADER, GUARANTEE_NOTE, ROUND_HEADER, findings, guarantee_rows,
                                         round_rows, run_lines)
from fedtune.common.storage import atomic_write

# the tasks' headline metrics (Task.headline_metric), named here so a report never imports a task (torch)
REPORT_METRICS = ("accuracy", "perplexity")
REPORT_FILES = ("report.md", "report.html", "epsilon_per_round.png") + tuple(f"test_{m}.png" for m in REPORT_METRICS)


def check_out_dir(out_dir: Path) -> None:
    """Refuse a folder that holds anything but a previous report: never mix a report into other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FedtuneError(f"--out {out_dir} is a file; give a folder for the report")
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in REPORT_FILES) if out_dir.is_dir() else []
    if other:
        raise FedtuneError(f"--out {out_dir} is not empty and holds more than a previous report "
                           f"({len(other)} other entries); give an empty or new folder")


def write_report(*, result: AuditResult, run_dir: Path | None, out_dir: Path) -> list[Path]:
    """Write the plots and both reports into `out_dir`; returns the files written.

    `run_dir` is the run directory audited (None for a ledger on its own)."""
    from fedtune.common.ledger.report_plots import plot_all  # matplotlib: only a report needs it

    facts = gather_facts(result=result, run_dir=run_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        images = plot_all(result=result, run_dir=run_dir, out_dir=out_dir, metrics=REPORT_METRICS,
                          initial=facts.initial_scores)
        markdown = _markdown(result, facts, [p.name for p in images], out_dir / "report.md")
        page = out_dir / "report.html"
        atomic_write(page, render_html(result=result, facts=facts, images=images))
    except OSError as exc:
        raise FedtuneError(f"cannot write the report into {out_dir} ({exc.strerror or exc}); "
                           f"pass --out DIR to write it elsewhere") from None
    return images + [markdown, page]


def _markdown(result: AuditResult, facts: RunFacts, images: list[str], path: Path) -> Path:
    lines = [f"# Privacy report: {result.verdict_text}", "",
             f"Verdict: **{result.verdict_text}** (exit code {result.exit_code}).", ""]
    lines += [f"- {line}" for line in run_lines(facts)] + ["", "## Guarantee per client", ""]
    lines += _table(GUARANTEE_HEADER, guarantee_rows(facts))
    lines += ["", GUARANTEE_NOTE, ""]
    lines += [f"![{name}]({name})" for name in images] + ["", "## Every round", ""]
    lines += _table(ROUND_HEADER, round_rows(result))
    lines += ["", "## Ledgers", ""]
    lines += [f"- {c.owner}: {c.records} records, key {c.key_fingerprint} "
              f"({result.key_use(c)}), "
              f"{'verifies' if not c.problems else str(len(c.problems)) + ' problem(s)'}" for c in result.ledgers]
    lines += ["", "## Findings", ""] + ([f"- {f}" for f in findings(result)] or ["- none"])
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in rows]
