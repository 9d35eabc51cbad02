"""Issue 34 ("Smaller"): what the round table, the audit's JSON, the adapter folder and the
messages counting rounds say."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from rich.console import Console

from tests.helpers import fedtune

# A DP round where every sampled node refused before spending anything (its policy refused the job).
ALL_REFUSED = {"round": 1, "clients_trained": 0, "clients_sampled": 2, "seconds": 1.0, "update_applied": False,
               "test_accuracy": 0.3, "test_macro_f1": 0.2,
               "clients": {f"client-{i}": {"status": "refused-policy", "num_examples": 0} for i in range(2)}}


def _table_text(config, record: dict) -> str:
    from fedtune.server.round_table import RoundTable

    buffer = io.StringIO()
    RoundTable.for_run(config, Console(file=buffer, width=200)).add(record)
    return buffer.getvalue()


def test_a_dp_round_where_every_node_refused_does_not_say_no_dp(tiny_config):
    shown = _table_text(tiny_config(dp=True), ALL_REFUSED)
    assert "none trained" in shown and "no DP" not in shown, shown
    assert "no DP" in _table_text(tiny_config(dp=False), ALL_REFUSED)  # only a run without DP says so


def test_audit_json_verdict_is_the_word_printed(finished_dp_run):
    """A simulation holds every private key: printed "consistent (...)", and so its JSON."""
    payload = json.loads(fedtune("audit", str(finished_dp_run.path), "--json").stdout)
    assert payload["verdict"] == "consistent" and payload["exit_code"] == 0, payload["problems"]
    assert payload["verdict_text"].startswith(payload["verdict"] + " (")
    printed = " ".join(fedtune("audit", str(finished_dp_run.path)).stdout.split())
    assert "Verdict: consistent (not independently attested" in printed, printed[-600:]


def test_every_file_of_the_exported_adapter_has_one_readable_mode(finished_dp_run):
    adapter = Path(finished_dp_run.path) / "adapter"
    modes = {path.name: path.stat().st_mode & 0o777 for path in adapter.rglob("*") if path.is_file()}
    assert "adapter_model.safetensors" in modes and "README.md" in modes
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, {name: oct(mode) for name, mode in modes.items()}


def test_one_round_is_counted_in_the_singular(tiny_config, tmp_path):
    from fedtune.server.round_table import run_banner

    banner = run_banner(tiny_config(num_rounds=1, dp=True), run_dir=tmp_path)
    assert "2 clients, 1 round, DP-SGD" in banner, banner
    assert "3 rounds," in run_banner(tiny_config(num_rounds=3), run_dir=tmp_path)
    over = fedtune("plan", "--dataset-size", "1000", "--noise-multiplier", "0.3", "--rounds", "1",
                   "--mode", "adapter")
    assert over.returncode == 2 and "clients refuse round 1." in " ".join(over.stderr.split()), over.stderr


def test_every_count_of_rounds_reads_in_the_singular_for_one(tiny_config):
    from fedtune.common.counts import counted, rounds_from_1
    from fedtune.common.privacy.plan import size_problem

    assert (counted(1, "round"), counted(3, "round"), counted(0, "step")) == ("1 round", "3 rounds", "0 steps")
    assert rounds_from_1(1, kind="probe round") == "probe round 1"
    assert rounds_from_1(3, kind="probe round") == "probe rounds 1-3"
    capped = size_problem(tiny_config(num_rounds=2), num_examples=100, max_rounds=1)
    assert "plans at most 1 round (policy max-rounds)" in capped, capped
    schedule = fedtune("plan", "--dataset-size", "1000", "--mode", "two-stage", "--probe-rounds", "1")
    assert schedule.returncode == 0 and "two-stage: probe round 1: noise multiplier" in schedule.stdout, schedule.stdout
    assert "1-1" not in schedule.stdout


def test_the_coordinators_own_console_does_not_wrap_a_log(tiny_config):
    """A ServerApp under `flwr run` or a deployment prints with the console it makes itself: into a
    log (not a terminal, as here under pytest) a long line stays one line."""
    import contextlib

    from fedtune.server.round_table import RoundTable, log_console

    console = log_console()
    assert console.soft_wrap and console.width == 120
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        table = RoundTable.for_run(tiny_config())
        table.console.print("word " * 60 + "end", highlight=False)
    assert buffer.getvalue().count("\n") == 1, buffer.getvalue()
