"""`fedtune audit --report`: the privacy report, opened in a real headless Chromium.

On the stored run of the tiny model (tests/fixtures): fast, no simulation. The report is
written with --out, copied alone into an empty folder (as if mailed) and rendered there: every
image must decode (naturalWidth > 0), and delta and the verdict must be on the page.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, fedtune

RUN = Path(__file__).parent / "fixtures" / "run-made-before-the-layout-change"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-img-widths', "
         "[...document.images].map(i => i.complete ? i.naturalWidth : -1).join(',')));</script>")
UNPINNED = "consistent (keys not pinned: the run directory's own keys were trusted)"


def _report(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "report"
    result = fedtune("audit", str(RUN), "--report", "--out", str(out), *extra)
    return result, out


def _render(page: Path, tmp_path: Path) -> str:
    """The DOM Chromium built from `page`, with each image's decoded width recorded in it."""
    alone = tmp_path / "mailed"
    alone.mkdir()
    probe = alone / "report.html"  # the page alone in a folder: nothing beside it to link to
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# `make setup` installs chromium wherever it can (root with apt-get): there a missing browser is a
# failure, not a skip. Only a machine where setup could not install it skips, and says why.
SETUP_COULD_INSTALL = os.geteuid() == 0 and shutil.which("apt-get") is not None


@pytest.mark.skipif(CHROMIUM is None and not SETUP_COULD_INSTALL,
                    reason="chromium is not installed and make setup cannot install it here (no root apt-get)")
def test_the_report_renders_in_chromium_with_its_images_delta_and_verdict(tmp_path):
    assert CHROMIUM, "chromium is missing although make setup installs it on this machine: run make setup"
    result, out = _report(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = _render(out / "report.html", tmp_path)
    widths = [int(w) for w in re.search(r'data-img-widths="([^"]*)"', dom).group(1).split(",")]
    assert len(widths) == 2 and all(w > 0 for w in widths), widths  # epsilon per round, test accuracy
    assert "δ" in dom and "1e-05" in dom  # the run's delta, in the guarantee table
    assert "Verdict: " + UNPINNED.replace("'", "&#x27;") in dom or "Verdict: " + UNPINNED in dom
    assert "one training record" in dom and "Opacus PRV accountant" in dom and "dp_accounting PLD" in dom


def test_the_report_states_what_an_officer_signs(tmp_path):
    result, out = _report(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<img src="([^"]{0,22})', page) == ["data:image/png;base64,"] * 2  # self-contained
    markdown = (out / "report.md").read_text(encoding="utf-8")
    run_id = json.loads((RUN / "run.json").read_text())["run_id"]
    for expected in (f"Run id: {run_id}", "fedtune version: ", "Report: 20", "Run: 20", "Task: classification",
                     "| client-0 | 3.9909 |", "| 4 | 1e-05 | one training record |", "Opacus PRV accountant",
                     "re-checked by the audit: Google dp_accounting PLD accountant", "# Privacy report: " + UNPINNED):
        assert expected in markdown, expected
    assert "clipping bound C" in markdown and "σ (noise multiplier)" in markdown and "q (sampling rate)" in markdown


def test_pinned_keys_make_the_verdict_clean_in_text_json_and_html(tmp_path):
    keys = [f"--public-key=client-{c}={RUN / 'ledgers' / f'client-{c}' / 'ledger.pub'}" for c in (0, 1)]
    result, out = _report(tmp_path, *keys)
    assert result.returncode == 0 and "Verdict: clean (exit 0)" in result.stdout, result.stdout[-1500:]
    assert 'class="verdict" style="background:#1a7f37">Verdict: clean' in (out / "report.html").read_text()
    payload = json.loads(fedtune("audit", str(RUN), "--json", keys[0]).stdout)  # client-1's key not pinned
    assert payload["verdict"] == "consistent" and payload["keys_pinned"] is False
    assert payload["verdict_text"] == ("consistent (keys of client-1 not pinned: the run directory's own keys "
                                       "were trusted for them)")
    assert [row["delta"] for row in payload["rows"]] == [1e-05] * 4
    text = fedtune("audit", str(RUN)).stdout
    assert f"Verdict: {UNPINNED} (exit 0)" in text and "δ" in text


def test_out_leaves_the_run_untouched_and_refuses_a_folder_holding_other_files(tmp_path):
    before = sorted(p.relative_to(RUN) for p in RUN.rglob("*"))
    result, out = _report(tmp_path)
    assert result.returncode == 0 and sorted(p.relative_to(RUN) for p in RUN.rglob("*")) == before
    again, _ = _report(tmp_path)  # a previous report there: written over
    assert again.returncode == 0, again.stderr
    (out / "notes.txt").write_text("someone's notes")
    refused, _ = _report(tmp_path)
    message = refused.stderr.strip()
    assert refused.returncode == 3 and len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert "is not empty and holds more than a previous report" in message
    assert (out / "notes.txt").read_text() == "someone's notes"
    alone = fedtune("audit", str(RUN), "--out", str(tmp_path / "x"))
    assert alone.returncode == 3 and "add --report" in alone.stderr


def test_the_audit_and_report_never_import_torch(tmp_path):
    """torch (through a task or the Opacus plan module) costs seconds: the audit needs neither."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr))\n"
            f"sys.argv = ['fedtune', 'audit', {str(RUN)!r}, '--report', '--out', {str(tmp_path / 'r')!r}]\n"
            "runpy.run_module('fedtune', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip().endswith("no torch"), result.stderr[-2000:]


def test_the_report_plots_every_tasks_headline_metric():
    from fedtune.common.ledger.report import REPORT_METRICS
    from fedtune.common.tasks import TASK_NAMES, get_task

    assert {get_task(name).headline_metric for name in TASK_NAMES} <= set(REPORT_METRICS)


def test_a_client_id_with_dollar_signs_is_plotted_as_text(tmp_path):
    """A ledger's client id reaches the legend: matplotlib must not parse it as math and fail."""
    from types import SimpleNamespace

    from fedtune.common.ledger.report_plots import plot_all

    rows = [SimpleNamespace(client_id=r"a$\foo$", round=1, claimed_epsilon=2.0, target_epsilon=8.0)]
    written = plot_all(result=SimpleNamespace(rows=rows), run_dir=None, out_dir=tmp_path, metrics=(), initial={})
    assert [p.name for p in written] == ["epsilon_per_round.png"] and written[0].stat().st_size > 0
