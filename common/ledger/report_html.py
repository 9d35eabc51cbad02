"""report.html: one self-contained page (plots embedded as data: URIs), so it survives being mailed.

The verdict is green only when the audit is clean on keys the institutions vouch for (pinned by
the auditor, their private halves not in the directory: common/ledger/trust.py); a run checked
against the keys its own directory holds is shown as "consistent", in blue, with what it rested on.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from fedtune.common.ledger.audit import AuditResult
from fedtune.common.ledger.report_facts import RunFacts
from fedtune.common.ledger.report_tables import (GUARANTEE_HEADER, GUARANTEE_NOTE, ROUND_HEADER, findings, guarantee_rows,
                                         round_rows, run_lines)

COLOURS = {"pinned": "#1a7f37", "unpinned": "#0969da", 1: "#cf222e", 2: "#9a6700"}
STYLE = """body{font-family:system-ui,sans-serif;max-width:84em;margin:2em auto;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #d0d7de;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f6f8fa;white-space:normal;vertical-align:bottom}td:first-child,th:first-child{text-align:left}.verdict{padding:.6em 1em;border-radius:6px;
color:#fff;display:inline-block}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}
dd{margin:0}img{max-width:100%;height:auto}.note{color:#57606a;font-size:.95em}"""


def render_html(*, result: AuditResult, facts: RunFacts, images: list[Path]) -> str:
    esc = html.escape
    colour = COLOURS[result.exit_code] if result.exit_code else COLOURS["pinned" if result.attested else "unpinned"]
    facts_list = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, _, v in
                         (line.partition(": ") for line in run_lines(facts)))
    imgs = "".join(f'<p><img src="{_data_uri(path)}" alt="{esc(path.stem.replace("_", " "))}"></p>' for path in images)
    items = "".join(f"<li>{esc(f)}</li>" for f in findings(result)) or "<li>none</li>"
    ledgers = "".join(f"<li>{esc(c.owner)}: {c.records} records, key {esc(c.key_fingerprint)} "
                      f"({result.key_use(c)}), "
                      f"{'verifies' if not c.problems else str(len(c.problems)) + ' problem(s)'}</li>"
                      for c in result.ledgers)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedtune privacy report {esc(facts.run_id)}</title>
<style>{STYLE}</style></head><body>
<h1>Privacy report</h1>
<p id="verdict" class="verdict" style="background:{colour}">Verdict: {esc(result.verdict_text)}
(exit code {result.exit_code})</p>
<dl id="run">{facts_list}</dl>
<h2>Guarantee per client</h2>
{_table(GUARANTEE_HEADER, guarantee_rows(facts), "guarantee")}
<p class="note">{esc(GUARANTEE_NOTE)}</p>
{imgs}
<h2>Every round</h2>
{_table(ROUND_HEADER, round_rows(result), "rounds")}
<h2>Ledgers</h2><ul>{ledgers}</ul>
<h2>Findings</h2><ul id="findings">{items}</ul>
</body></html>
"""


def _table(header: list[str], rows: list[list[str]], name: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{name}"><tr>{head}</tr>{body}</table>'


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
