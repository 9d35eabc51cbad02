"""Simulation keys for GPUs and Ray clusters (issue 32): the backend Flower's Ray engine gets, the
clear errors before Ray starts, a simulated client held to its share of a GPU's memory, and a
real `fedtune simulate` attached to a Ray cluster started with `ray start --head` on this machine
(the suite's one Ray run, in tests/test_simulation.py)."""

from __future__ import annotations

import pytest
import torch

import fedtune.client.app as client_app
from fedtune.client.app import hold_to_gpu_share
from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile
from fedtune.simulations.simulate import IN_PROCESS, RAY, check_engine, cpus_per_client, ray_backend_config, simulate


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
    monkeypatch.setattr(client_app, "in_simulated_node", lambda: True)
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
    monkeypatch.setattr(client_app, "in_simulated_node", lambda: False)  # the in-process engine: the driver
    hold_to_gpu_share(half, ExecutionProfile(device="cuda:0"))
    assert memory_fractions == [(0.5, 1)]
