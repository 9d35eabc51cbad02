"""Simulation keys for GPUs and Ray clusters (issue 32): the backend Flower's Ray engine gets, the
clear errors before Ray starts, a simulated client held to its share of a GPU's memory, and a
real `fedtune simulate` attached to a Ray cluster started with `ray start --head` on this machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

import client.app
from client.app import hold_to_gpu_share
from common.config import RunConfig
from common.errors import FedtuneError
from common.execution import ExecutionProfile
from simulations.simulate import IN_PROCESS, RAY, check_engine, cpus_per_client, ray_backend_config, simulate
from tests.helpers import fedtune, read_metrics, run_fedtune, set_args

RAY_CLI = Path(sys.executable).parent / "ray"


# -- the backend config, and the errors before Ray starts ----------------------------------------

def test_backend_config_carries_the_gpu_share_and_the_cluster_address():
    attached = RunConfig().with_overrides(gpus_per_client=0.5, ray_address="10.0.0.5:6379")
    backend = ray_backend_config(attached, verbose=False)
    assert backend["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}  # a cluster: one core, not ours
    assert backend["init_args"]["address"] == "10.0.0.5:6379"
    assert ray_backend_config(attached.with_overrides(threads=3), verbose=False)["client_resources"]["num_cpus"] == 3
    local = RunConfig().with_overrides(gpus_per_client=2.0)
    backend = ray_backend_config(local, verbose=True)
    assert backend["client_resources"] == {"num_cpus": cpus_per_client(local), "num_gpus": 2.0}
    # a Ray of its own, never one found through RAY_ADDRESS or a `ray start` on this machine
    assert backend["init_args"]["address"] == "local" and backend["init_args"]["log_to_driver"] is True


def test_ray_address_with_the_in_process_engine_is_refused_before_anything_runs(tmp_path):
    config = RunConfig().with_overrides(ray_address="10.0.0.5:6379")
    with pytest.raises(FedtuneError, match="needs the Ray engine; drop --engine in-process"):
        simulate(config=config, out=tmp_path / "run", engine=IN_PROCESS)
    assert not (tmp_path / "run").exists()
    check_engine(config, RAY)  # the Ray engine attaches


def test_a_gpu_share_without_a_gpu_is_refused_unless_a_cluster_runs_the_clients(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = RunConfig().with_overrides(gpus_per_client=0.5)
    with pytest.raises(FedtuneError, match="torch sees no CUDA GPU here; set gpus-per-client = 0"):
        simulate(config=config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    check_engine(config.with_overrides(ray_address="10.0.0.5:6379"), RAY)  # the cluster's nodes may have GPUs
    check_engine(config.with_overrides(gpus_per_client=0.0), RAY)


# -- a simulated client's share of a GPU's memory ------------------------------------------------

@pytest.fixture
def memory_fractions(monkeypatch) -> list[tuple]:
    """The calls torch.cuda.set_per_process_memory_fraction gets (no GPU here: a recorder), inside a
    Ray actor of the simulation engine."""
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *args: calls.append(args))
    monkeypatch.setattr(client.app, "in_simulated_node", lambda: True)
    return calls


def test_the_gpu_share_is_a_no_op_without_cuda(memory_fractions, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hold_to_gpu_share(RunConfig().with_overrides(gpus_per_client=0.5), ExecutionProfile())
    assert memory_fractions == []


def test_a_client_on_cuda_is_held_to_its_share_of_the_gpu_memory(memory_fractions, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    half = RunConfig().with_overrides(gpus_per_client=0.5)
    hold_to_gpu_share(half, ExecutionProfile(device="cuda:1"))
    assert memory_fractions == [(0.5, 1)]
    hold_to_gpu_share(half, ExecutionProfile(device="cpu"))  # a client told to train on the CPU
    hold_to_gpu_share(half.with_overrides(gpus_per_client=1.0), ExecutionProfile(device="cuda:0"))  # a whole GPU
    hold_to_gpu_share(None, ExecutionProfile(device="cuda:0"))  # a deployed node: its hardware is its own
    monkeypatch.setattr(client.app, "in_simulated_node", lambda: False)  # the in-process engine: the driver
    hold_to_gpu_share(half, ExecutionProfile(device="cuda:0"))
    assert memory_fractions == [(0.5, 1)]


# -- a real Ray cluster on this machine -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A one-node Ray cluster: `ray start --head --block` in a session of its own, so every process
    it starts is known by its process group (and its temp dir), and stopped by id, never by `ray
    stop`, which stops every Ray process on the machine (another test's simulation included)."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir  # short on purpose: Ray's Unix sockets live under it
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        # Ray 2.55 cannot be held to the loopback: --node-ip-address=127.0.0.1 is replaced by this
        # machine's address (ray/_private/services.py resolve_ip_for_localhost) and the GCS listens
        # on every interface. Its own temp dir keeps `ray_current_cluster` out of /tmp/ray, where a
        # plain ray.init() elsewhere would find it and attach.
        with (temp_dir / "ray-start.log").open("w") as log:
            self.head = subprocess.Popen(
                [str(RAY_CLI), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2", "--num-gpus=0",
                 "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                 f"--ray-client-server-port={_free_port()}"],
                stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
        try:
            self.address = self._wait_for_address(timeout=120)
        except BaseException:
            self.stop()
            raise

    def _wait_for_address(self, *, timeout: float) -> str:
        """The GCS address `ray start` writes once the node is up (what it tells a user to attach to)."""
        written = self.temp_dir / "ray_current_cluster"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.head.poll() is None:
            if written.is_file() and written.read_text().strip():
                return written.read_text().strip()
            time.sleep(0.5)
        raise AssertionError(f"ray start gave no address: {(self.temp_dir / 'ray-start.log').read_text()[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        """The cluster's live processes: `ray start`'s process group, or any naming its temp dir."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                named = str(self.temp_dir) in " ".join(proc.info["cmdline"] or ())
                mine = named or os.getpgid(proc.pid) == self.head.pid
                if mine and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.Error, ProcessLookupError):
                continue
        return found

    def actor_logs(self, actor: str) -> list[Path]:
        """The stdout logs of the cluster's workers that hosted an `actor`."""
        return [log for log in self.temp_dir.glob("session_latest/logs/worker-*.out")
                if f":actor_name:{actor}" in log.read_text(errors="replace")]

    def names(self) -> set[str]:
        return {proc.name() for proc in self.processes()}

    def stop(self) -> None:
        """SIGTERM to each of the cluster's processes, by id; SIGKILL to any left after 10 s."""
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            procs = self.processes()
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=grace)
        self.head.wait(timeout=10)


@pytest.fixture
def ray_cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cluster = None
    try:
        cluster = Cluster(temp_dir)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_simulation_attaches_to_a_running_ray_cluster_and_leaves_it_running(ray_cluster, tiny_config, tmp_path):
    """`ray-address` = the address `ray start --head` gave: the clients train as the cluster's actors,
    the run audits clean, and the cluster outlives the run (Flower disconnects, it does not stop it)."""
    config = tiny_config(num_clients=2, clients_per_round=2, num_rounds=1)
    assert {"raylet", "gcs_server"} <= ray_cluster.names()
    out = tmp_path / "run"
    keys = dict(model=config.model, data=config.data, num_clients=2, clients_per_round=2, num_rounds=1,
                batch_size=config.batch_size, max_length=config.max_length, learning_rate=config.learning_rate,
                head_learning_rate=config.head_learning_rate, lora_variant=config.lora_variant,
                lora_rank=config.lora_rank, target_epsilon=config.target_epsilon,
                training_mode=config.training_mode, ray_address=ray_cluster.address)
    result = run_fedtune("simulate", "--out", str(out), *set_args(**keys), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [record] = read_metrics(out)
    assert sorted(record["clients"]) == ["client-0", "client-1"]
    assert all(entry["status"] == "trained" for entry in record["clients"].values())
    audit = fedtune("audit", str(out), "--json")
    assert audit.returncode == 0, audit.stdout[-3000:]
    # the clients were the cluster's actors: one per core of its 2 (one core each, not this machine's share)
    assert len(ray_cluster.actor_logs("ClientAppActor")) == 2
    # Flower ended with ray.shutdown(): the driver disconnected, the cluster it attached to runs on
    assert ray_cluster.head.poll() is None and {"raylet", "gcs_server"} <= ray_cluster.names()
    ray_cluster.stop()
    assert ray_cluster.processes() == [], [(p.pid, p.name()) for p in ray_cluster.processes()]
