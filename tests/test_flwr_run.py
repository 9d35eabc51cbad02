"""`flwr run .` on a local simulation federation: offline, one run directory (client ledgers and
their keys included), the same table and summary as `fedtune simulate`, an audit that passes; and
the threat-model side: a SuperNode never takes its ledger dir or roster from the coordinator."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from flwr.app import Context, RecordDict

from fedtune.client import app as client_app
from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.flwr_run import flwr_run_dir
from fedtune.common.secure_aggregation.roster import NO_ROSTER
from fedtune.server.flwr_run import simulation_config
from fedtune.server.run_directory import write_simulation_roster
from tests.deployment import BIN, free_port
from tests.helpers import ROOT, fedtune

# What `flwr run` packs, and its config: the package root fedtune/__init__.py without the CLI, and
# without the symlinks that make fedtune.common the top-level common/ (Flower never follows them).
APP_FILES = ("pyproject.toml", ".gitignore", "fedtune/__init__.py", "common", "client", "server")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _context(tmp_path: Path, node_config: dict) -> Context:
    run_config = RunConfig(output_dir=str(tmp_path / "coordinator-chose")).to_flower()
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_a_supernode_takes_neither_ledger_dir_nor_roster_from_the_run_config(tmp_path, monkeypatch):
    """Outside Flower's simulation runtime, a coordinator that names an output-dir and writes a
    roster there (with keys it made for the node) moves no ledger and is trusted by no node."""
    monkeypatch.chdir(tmp_path)
    context = _context(tmp_path, {"partition-id": 0, "num-partitions": 2})
    write_simulation_roster(tmp_path / "coordinator-chose" / "ledgers", num_clients=2)
    monkeypatch.setattr(client_app, "in_simulated_node", lambda: False)
    node = client_app.secagg_node_of(context, *client_app.binding(context, None, None))
    assert node.problem == NO_ROSTER and node.roster is None
    assert node.ledger_dir == Path("ledgers") / "client-0"  # the node's own working directory, as before
    assert client_app.policy_of(context, client_app.binding(context, None, None)[0]).share_train_loss is False


def test_a_node_config_ledger_dir_and_roster_win_even_in_the_simulation_runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(client_app, "in_simulated_node", lambda: True)
    own = tmp_path / "site" / "ledger"
    context = _context(tmp_path, {"client-id": "site-a", "data": str(tmp_path / "site" / "notes.csv"),
                                  "ledger-dir": str(own), "roster": str(tmp_path / "site" / "roster.json")})
    node = client_app.secagg_node_of(context, *client_app.binding(context, None, None))
    assert node.ledger_dir == own
    assert str(tmp_path / "site" / "roster.json") in node.problem  # its own roster (missing here), not the run's
    assert not (tmp_path / "coordinator-chose").exists()
    # Inside a Ray actor, even with the engine's partition keys: a node naming its own data is an
    # institution, so the job is only a request (no run config as policy, no run directory).
    hosted = _context(tmp_path, {"partition-id": 0, "num-partitions": 2, "data": str(tmp_path / "site" / "n.csv")})
    assert client_app.binding(hosted, None, None) == (None, None)


def test_a_simulated_node_keeps_its_ledger_under_the_runs_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(client_app, "in_simulated_node", lambda: True)
    context = _context(tmp_path, {"partition-id": 1, "num-partitions": 2})
    root = tmp_path / "coordinator-chose" / "ledgers"
    write_simulation_roster(root, num_clients=2)
    node = client_app.secagg_node_of(context, *client_app.binding(context, None, None))
    assert node.ledger_dir == root / "client-1" and node.problem is None and node.roster is not None
    assert flwr_run_dir(output_dir="", flower_run_id=42) == Path("runs") / "flwr-42"


def test_a_simulation_federation_follows_its_size_and_refuses_a_contradicting_num_clients():
    class Grid:
        def get_node_ids(self):
            return [11, 12]

    with pytest.raises(FedtuneError, match=r"has 2 SuperNodes but num-clients=3: run `flwr run \. "
                                           r"--federation-config num-supernodes=3`"):
        simulation_config(Grid(), {"num-clients": 3}, wait_s=0)
    config = simulation_config(Grid(), {"num-clients": 0, "clients-per-round": 0}, wait_s=0)  # pyproject's
    assert (config.num_clients, config.clients_per_round) == (2, 2)


def offline_environment(home: Path, uv_cache: Path) -> dict[str, str]:
    """No package index reachable, and Flower's runtime dependency installation switch NOT passed:
    the venv's own .pth (Makefile) must set it, as for a user who types `flwr run .`."""
    uv_cache.mkdir(parents=True, exist_ok=True)
    dead = "http://127.0.0.1:9/simple"
    env = {k: v for k, v in os.environ.items()  # the FAB's own copy is what runs: no PYTHONPATH
           if k not in ("PYTHONPATH", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", FLWR_HOME=str(home),
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               FLWR_TELEMETRY_ENABLED="0",
               PIP_NO_INDEX="1", PIP_INDEX_URL=dead, UV_OFFLINE="1", UV_INDEX_URL=dead, UV_DEFAULT_INDEX=dead,
               UV_CACHE_DIR=str(uv_cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", COLUMNS="120")
    return env


def stop_local_superlink(home: Path) -> None:
    """`flwr run` leaves its local SuperLink running in the background: end it and its children
    (found by this test's own FLWR_HOME in their command lines)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "flower-superlink" in cmdline and str(home) in cmdline:
            found += [process, *process.children(recursive=True)]
    for process in found:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(found, timeout=30)


def printed_summary(output: str) -> tuple[list[str], dict, list[str]]:
    """The round table's lines, the summary JSON, and what follows it (only Flower's own log)."""
    lines = ANSI.sub("", output).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["round", "trained"])
    start = next(i for i in range(header, len(lines)) if lines[i] == "{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return lines[header:start], json.loads("\n".join(lines[start:end + 1])), lines[end + 1:]


@pytest.mark.slow
def test_flwr_run_offline_writes_one_run_directory_that_audits_clean(tmp_path, tiny_model_dir, tiny_csv):
    checkout, home = tmp_path / "checkout", tmp_path / "flwr-home"
    checkout.mkdir()
    for name in APP_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, checkout / name)
    run_config = (f"model='{tiny_model_dir}' data='{tiny_csv}' num-clients=3 clients-per-round=3 num-rounds=1 "
                  f"batch-size=16 max-length=24 learning-rate=0.01 lora-rank=4 target-epsilon=4.0 lora-variant='lora' training-mode='adapter'")
    started = time.monotonic()
    try:
        result = subprocess.run([str(BIN / "flwr"), "run", ".", "--stream", "--run-config", run_config,
                                 "--federation-config", "num-supernodes=3"], cwd=checkout,
                                env=offline_environment(home, tmp_path / "uv-cache"), capture_output=True,
                                text=True, timeout=900)
    finally:
        stop_local_superlink(home)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    print(f"`flwr run .` (3 clients, 1 round, tiny model) took {seconds:.1f} s")
    assert result.returncode == 0, output[-4000:]
    flower_run_id = re.search(r"Successfully started run (\d+)", output).group(1)
    run_dir = checkout / "runs" / f"flwr-{flower_run_id}"
    assert f"SecAgg+ → {run_dir}" in output, output[-4000:]
    table, summary, after = printed_summary(output)
    rows = [line for line in table[1:] if not line.lstrip().startswith("round ")]  # a round's note may follow it
    assert len(rows) == 1 and rows[0].split()[:2] == ["1", "3/3"], table
    assert "top class" in table[0], table  # the share of test predictions in the largest class
    assert summary == json.loads((run_dir / "summary.json").read_text()) and summary["rounds_completed"] == 1
    # Ray may relay an actor's teardown line ("(ClientAppActor pid=N) ... Manually terminating") late.
    assert not [line for line in after if line.strip() and not line.lstrip().startswith(("INFO", "DEBUG"))
                and "Manually terminating ClientAppActor" not in line], after
    for client in ("client-0", "client-1", "client-2"):
        assert {"ledger.jsonl", "ledger.key", "ledger.pub"} <= {p.name for p in (run_dir / "ledgers" / client).iterdir()}
    assert (run_dir / "ledgers" / "roster.json").is_file() and (run_dir / "ledgers" / "server").is_dir()
    assert sorted(p.name for p in checkout.iterdir()) == sorted([*(name.split("/")[0] for name in APP_FILES), "runs"])  # no ./ledgers, nothing else
    assert not (home / "runtime-envs").exists() and "Installing application dependencies" not in output
    audit = fedtune("audit", str(run_dir))
    # One researcher held every key: the audit says the run is consistent, not attested, exit 0.
    assert audit.returncode == 0 and "Verdict: consistent (not independently attested" in audit.stdout, \
        audit.stdout[-3000:] + audit.stderr[-2000:]
