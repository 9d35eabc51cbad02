"""How the `fedtune` command behaves around the work: exit codes, usage errors, -h, --version,
unexpected errors (one line, a log without local variables), `plan` (fast, delta, over budget),
`simulate --out/--quiet/--json`, progress inside a round, and one Ctrl-C.

Commands run in this process (`fedtune`) unless the process is the subject: the installed entry
point's exit codes and help, the torch-free --version, and the Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import opacus  # noqa: F401  the real package: `plan` in this process must not stand in its torch-free one
import pytest

from tests.helpers import ROOT, fedtune, set_args


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("args, expected", [
    (["simulate", "--bogus"], "No such option '--bogus'"),
    (["audit", "--bogus", "x"], "No such option '--bogus'"),
    (["audit"], "Missing argument 'TARGET'"),
    (["plan"], "Missing option '--dataset-size'"),
    (["simulat"], "No such command 'simulat'. Did you mean 'simulate'?"),
])
def test_usage_errors_exit_4_distinct_from_the_audit_verdicts(args, expected):
    result = fedtune(*args)
    assert result.returncode == 4, result.stderr
    assert expected in result.stderr
    assert result.stderr.count("Did you mean") <= 1


def test_an_unknown_engine_is_bad_input_refused_before_anything_starts(tmp_path):
    result = fedtune("simulate", "--engine", "dask", "--out", str(tmp_path / "run"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert _lines(result.stderr) == ["error: no simulation engine 'dask'; choose one of ray, in-process"]
    assert result.stdout == "" and not (tmp_path / "run").exists()


def test_help_alias_exit_codes_and_version():
    """The installed `fedtune` script itself: help with the documented exit codes, and a usage
    error's exit status as a shell sees it; the subcommands' help in this process."""
    binary = Path(sys.executable).parent / "fedtune"
    env = dict(os.environ, COLUMNS="120")
    top = subprocess.run([str(binary), "-h"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "Usage:" in top.stdout, top.stderr
    for code in ("0 clean", "1 verification failed", "2 budget exceeded", "3 bad input", "4 usage error",
                 "5 unexpected error", "130 interrupted"):
        assert code in " ".join(top.stdout.split()), code
    typo = subprocess.run([str(binary), "simulat"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert typo.returncode == 4 and "Did you mean 'simulate'?" in typo.stderr, typo.stderr
    for command in (["simulate", "-h"], ["audit", "-h"], ["plan", "-h"], ["roster", "check", "-h"]):
        result = fedtune(*command)
        assert result.returncode == 0 and "Usage:" in result.stdout, command
    assert "--engine" in fedtune("simulate", "-h").stdout
    # --version reads package metadata: torch is never imported for it
    probe = subprocess.run([sys.executable, "-c", "import sys; from fedtune.main import run_cli; "
                            "code = run_cli(['--version']); print(code, 'torch' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    first, last = probe.stdout.splitlines()[0], probe.stdout.splitlines()[-1]
    assert first.startswith("fedtune ") and all(f"{name} " in first for name in ("flwr", "opacus", "torch"))
    assert last == "0 False"


def test_plan_rejects_cheap_mistakes_with_one_line():  # its speed: benchmarks/cli_latency.py
    for args, expected in [
        (["--target-epsilon", "0"], "'target-epsilon' must be a positive number"),
        (["--plot", "/nonexistent/dir/x.png"], "--plot: folder /nonexistent/dir does not exist"),
        (["--delta", "0.5"], "--delta 0.5 is not below 1/1000"),
    ]:
        result = fedtune("plan", "--dataset-size", "1000", *args)
        assert result.returncode == 3, result.stderr
        lines = _lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr and "locals" not in result.stderr


def test_plan_shows_delta_and_says_when_clients_would_refuse():
    ok = fedtune("plan", "--dataset-size", "1000", "--noise-multiplier", "1.0", "--mode", "adapter")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("adapter: ") and "at delta 1e-05" in " ".join(ok.stdout.split())
    assert any("round" in line and "delta" in line for line in ok.stdout.splitlines())  # the table's column
    assert "trains" in ok.stdout and "refuses" not in ok.stdout
    over = fedtune("plan", "--dataset-size", "1000", "--noise-multiplier", "0.3", "--mode", "adapter")
    assert over.returncode == 2, over.stderr
    assert "refuses" in over.stdout
    assert "over budget: round 1 would spend epsilon 33.9" in " ".join(over.stderr.split())
    assert "clients refuse rounds 1, 2, 3" in " ".join(over.stderr.split())
    large = fedtune("plan", "--dataset-size", "1000", "--delta", "0.5", "--allow-large-delta",
                    "--noise-multiplier", "1.0", "--mode", "adapter", "--json")
    assert large.returncode == 0 and json.loads(large.stdout)["delta"] == 0.5


def test_an_unexpected_error_is_one_line_and_a_log_without_local_variables(tmp_path, monkeypatch, capsys):
    from fedtune import plan_view
    from fedtune.main import run_cli

    def broken(request):
        patient_record = "SECRET-RECORD-TEXT"  # a local an error must never print
        int(patient_record)  # ValueError: its message quotes the value

    monkeypatch.setattr(plan_view, "schedule_of", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = run_cli(["plan", "--dataset-size", "1000"])
    captured = capsys.readouterr()
    assert code == 5
    lines = _lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("unexpected error: ValueError"), captured.err
    assert "SECRET" not in captured.err + captured.out
    logs = list((tmp_path / "cache" / "fedtune" / "logs").glob("fedtune-error-*.log"))
    assert len(logs) == 1 and f"the traceback is in {logs[0]}" in captured.err
    text = logs[0].read_text()
    assert "Traceback" in text and "builtins.ValueError" in text and "in broken" in text
    assert "SECRET" not in text  # neither the local nor the exception's message, which quotes it
    assert os.stat(logs[0]).st_mode & 0o077 == 0  # only its owner reads it


def test_an_error_line_prints_brackets_as_text_not_markup(capsys):
    from fedtune.main import run_cli

    code = run_cli(["simulate", "--config", "/nonexistent/[/]odd[bold].toml"])
    captured = capsys.readouterr()
    assert code == 3 and "/nonexistent/[/]odd[bold].toml" in captured.err and "Traceback" not in captured.err


def test_out_into_an_unrelated_non_empty_folder_is_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not a run")
    result = fedtune("simulate", "--out", str(folder))
    assert result.returncode == 3
    lines = _lines(result.stderr)
    assert len(lines) == 1 and "is a non-empty folder that is not a fedtune run" in lines[0], result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


def test_round_table_names_delta_beside_epsilon():
    import io

    from rich.console import Console

    from fedtune.common.tasks import get_task
    from fedtune.server.round_table import RoundTable

    buffer = io.StringIO()
    table = RoundTable(get_task("classification"), Console(file=buffer, width=200), delta=1e-5)
    table.add({"round": 1, "clients_trained": 1, "seconds": 2.0, "test_accuracy": 0.5, "test_macro_f1": 0.4,
               "clients": {"client-0": {"train_loss": 1.0, "epsilon": 2.5}}})
    assert "max ε (δ=1e-05)" in buffer.getvalue() and "2.500" in buffer.getvalue()


def test_each_client_reports_its_steps_and_the_status_line_counts_them(tiny_config, tmp_path):
    """The real ClientApp with its progress mod, in one process: every client's file reaches its
    planned DP steps, and the status line a terminal shows counts the trained clients."""
    import io

    from rich.console import Console

    from fedtune.client.app import build_client_app
    from fedtune.simulations import inprocess
    from fedtune.simulations.progress import RoundProgress, describe

    config = tiny_config(num_rounds=1, secure_aggregation=False)
    progress = tmp_path / "progress"
    started = time.time()
    app = build_client_app(config=config, ledger_root=tmp_path / "run" / "ledgers", progress_dir=progress)
    grid, run_dir = inprocess.federation(config, tmp_path / "run", client_app=app)
    inprocess.run(grid, config, run_dir)
    states = {p.stem: json.loads(p.read_text()) for p in progress.glob("*.json")}
    steps = inprocess.metrics(run_dir.path)[0]["clients"]["client-0"]["steps"]
    assert set(states) == {"client-0", "client-1"} and states["client-0"] == {**states["client-0"], "step": steps,
                                                                             "steps": steps}
    assert describe(progress, round_number=1, since=started, clients=2).startswith("round 1: 2/2 trained")
    assert "0/2 trained" in describe(progress, round_number=2, since=time.time() + 1, clients=2)
    screen = io.StringIO()
    with RoundProgress(progress, Console(file=screen, force_terminal=True, width=120), clients=2, first_round=1,
                       enabled=True) as shown:
        shown.since = started
        deadline = time.monotonic() + 15  # the line refreshes every 0.5 s; a loaded machine may be slower
        while "2/2 trained" not in screen.getvalue() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "2/2 trained" in screen.getvalue()
    quiet = io.StringIO()
    with RoundProgress(progress, Console(file=quiet, width=120), clients=2, first_round=1, enabled=True):
        time.sleep(0.6)
    assert quiet.getvalue() == ""  # not a terminal: no status line


@pytest.mark.slow
def test_one_ctrl_c_stops_the_simulation_and_names_the_resume_command(tiny_config, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: out within seconds, exit 130,
    no traceback, the checkpointed round and the exact resume command; the resume then finishes
    with --json (stdout: the summary alone)."""
    config = tiny_config(num_rounds=2)
    out = tmp_path / "run"
    keys = dict(model=config.model, data=config.data, num_clients=2, clients_per_round=2, batch_size=16,
                max_length=24, learning_rate=0.01, lora_variant="lora", lora_rank=4, target_epsilon=4.0,
                head_learning_rate=0.05, num_rounds=2, training_mode="adapter")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="120")
    process = subprocess.Popen([sys.executable, "-m", "fedtune", "simulate", "--quiet", "--out", str(out),
                                *set_args(**keys)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "ActorDiedError" not in stderr, stderr
    assert stdout == ""  # --quiet: no table, and no summary for a run that did not finish
    done = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["round"]
    assert f"interrupted: round {done} of 2 is checkpointed in {out}" in stderr, stderr
    assert f"resume with: fedtune simulate --resume {out}" in stderr
    import psutil

    def left() -> list[dict]:
        return [p.info for p in psutil.process_iter(["pid", "status", "cmdline"])
                if _group_of(p.pid) == process.pid and p.info["status"] != psutil.STATUS_ZOMBIE]

    gone_by = time.monotonic() + 20  # Ray's agents exit once the raylet is gone: seconds on a loaded machine
    while left() and time.monotonic() < gone_by:
        time.sleep(0.5)
    assert not left(), left()  # Ray is torn down with it (exited children only wait to be reaped)
    resumed = fedtune("simulate", "--engine", "in-process", "--resume", str(out), "--json")  # Ray's part is done
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)  # stdout holds the summary alone
    assert summary["rounds_completed"] == 2 and summary["target_delta"] == 1e-05
    assert "DP-SGD ε≤4 at δ=1e-05" in resumed.stderr and "max ε (δ=1e-05)" in resumed.stderr
    assert not (out / "progress").exists()


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_the_resume_line_is_written_before_rays_processes_are_killed(tmp_path):
    """Under load the watchdog tears Ray down while ray.shutdown() still runs; once the raylet is
    killed, Ray's core worker ends the process with status 1 at once. The line must already be out:
    here a stand-in raylet whose death ends the process with 1 the moment it is reaped."""
    script = """
import os, subprocess, sys, threading
import psutil
from fedtune.simulations import interrupt

raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "raylet"])
def core_worker():
    os.waitpid(raylet.pid, 0)  # the raylet is gone: Ray's core worker ends this process
    os._exit(1)
threading.Thread(target=core_worker, daemon=True).start()
class SlowStdout:  # a loaded machine: flushing the round table printed so far takes a while
    def flush(self):
        import time; time.sleep(0.5)
sys.stdout = SlowStdout()
interrupt._leave(os.dup(2), "interrupted: resume with: fedtune simulate --resume RUN\\n", [psutil.Process(raylet.pid)])
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "resume with: fedtune simulate --resume RUN" in result.stderr, (result.returncode, result.stderr)
    assert result.returncode in (130, 1)  # which of the two exits first is the kernel's choice; the line is out
