"""Nothing the coordinator started outlives it (issue 34), over real processes on loopback: a run
stopped with `flwr stop` takes its ServerApp process with it, and stopping `fedtune run-superlink`
(SIGTERM) ends flower-superlink and every ServerApp process it started. One SuperLink, no nodes:
the signed job's ServerApp waits for nodes that never come. And a ServerApp whose runtime was
killed outright (SIGKILL: no cleanup runs) ends by itself instead of retrying forever."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.deployment import LoopbackFederation, app_checkout, wait_for
from tests.test_pinned_deployment import job, make_sites, signed

SERVERAPP = "fedtune.serverapp_process"


def serverapps(link: psutil.Process, state_dir: str) -> list[psutil.Process]:
    """The ServerApp processes run-superlink started for this coordinator's state dir, still running."""
    found = []
    for child in link.children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if SERVERAPP in cmdline and state_dir in cmdline and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def alive(processes: list[psutil.Process]) -> list[str]:
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            continue
    return left


@pytest.mark.slow
def test_flwr_stop_and_stopping_run_superlink_leave_no_process_behind(tmp_path, tiny_model_dir):
    make_sites(tmp_path)
    fed = LoopbackFederation(workdir=tmp_path / "fed", credentials=tmp_path / "creds")
    state_dir = str(fed.workdir / "coordinator" / "state")
    try:
        link = fed.start_superlink(operator_key=tmp_path / "operator" / "operator.pub")
        coordinator = psutil.Process(link.popen.pid)
        # A signed job for three institutions, none of which ever connects: its ServerApp waits for them.
        app = app_checkout(tmp_path / "app")  # one bundle for both runs: the hash they were signed for
        submitted = fed.flwr_run_async(signed(job(tmp_path, tiny_model_dir, tmp_path / "run", rounds=1),
                                              key=tmp_path / "operator" / "operator.key"), app=app)
        wait_for(lambda: "Coordinating 3 clients" in link.text(), timeout=90, what="the run's ServerApp to wait")
        [waiting] = serverapps(coordinator, state_dir)
        # Stuck as a ServerApp deep in local work (or in Flower's retries) is: it never notices the stop
        # by itself (its heartbeat and grid calls would, when they run). The runtime must end it anyway.
        waiting.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        listed = fed.flwr("ls", "fedtune")
        run_id = re.search(r"(\d{6,})", listed.stdout)
        assert listed.returncode == 0 and run_id, listed.stdout + listed.stderr
        stopped = fed.flwr("stop", run_id.group(1), "fedtune")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        wait_for(lambda: not alive([waiting]), timeout=20, what="the stopped run's ServerApp to end")
        assert not serverapps(coordinator, state_dir)
        print(f"ServerApp gone {time.monotonic() - started:.1f} s after the stop")
        submitted.wait(timeout=30)  # `flwr run --stream` returns once its run is stopped

        # A second run, then SIGTERM to run-superlink: flower-superlink and the ServerApp end with it.
        fed.flwr_run_async(signed(job(tmp_path, tiny_model_dir, tmp_path / "run-2", rounds=1),
                                  key=tmp_path / "operator" / "operator.key"), app=app)
        wait_for(lambda: link.text().count("Coordinating 3 clients") == 2, timeout=90, what="the second ServerApp")
        descendants = coordinator.children(recursive=True)
        assert any("flower-superlink" in " ".join(p.cmdline()) for p in descendants), descendants
        coordinator.send_signal(signal.SIGTERM)
        link.popen.wait(timeout=30)
        wait_for(lambda: not alive(descendants), timeout=15, what="run-superlink's processes to end")
        assert link.popen.returncode is not None
    finally:
        fed.close()
    assert not alive(descendants), alive(descendants)


ORPHAN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; from fedtune.serverapp_process import exit_when_orphaned; "
                          "exit_when_orphaned(0.1); print('watching', flush=True); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_serverapp_whose_runtime_was_killed_exits_by_itself():
    runtime = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True)
    try:
        serverapp = psutil.Process(int(runtime.stdout.readline()))
        assert runtime.stdout.readline().strip() == "watching"
        runtime.kill()  # SIGKILL: the runtime's own cleanup never runs
        runtime.wait(timeout=10)
        wait_for(lambda: not alive([serverapp]), timeout=10, what="the orphaned ServerApp to exit")
    finally:
        for process in psutil.Process().children(recursive=True):
            process.kill()
        runtime.kill()
