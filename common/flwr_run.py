"""Where a `flwr run` simulation writes, agreed by its ServerApp and its ClientApps without a message.

Under `flwr run .` with a local simulation federation, one researcher holds every node, as in
`fedtune simulate`: the run directory holds the clients' ledgers (`ledgers/client-N/`) and the
roster they pin. Both sides derive the directory from what each already knows: the run config's
`output-dir` and Flower's run id (the one `flwr run` prints and `flwr ls` lists).

A node honours this only when it runs inside Flower's simulation runtime (a Ray actor of the
simulation engine), which is decided by whoever starts the node's process, never by the
coordinator: a deployed SuperNode keeps its ledger in its node config's `ledger-dir` and pins
only the roster its node config names.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

SIMULATION_ROSTER = "roster.json"  # in a simulation's ledger root, written by the researcher's side


def flwr_run_dir(*, output_dir: str, flower_run_id: int) -> Path:
    """The run directory of a `flwr run` job: its `output-dir`, or runs/flwr-<Flower's run id>."""
    return Path(output_dir) if output_dir else Path("runs") / f"flwr-{flower_run_id}"


def in_simulated_node() -> bool:
    """Whether this ClientApp runs in a Ray actor of Flower's simulation engine (not a SuperNode)."""
    ray = sys.modules.get("ray")  # a SuperNode's flwr-clientapp never imports Ray
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def sized_to_federation(run_config: Mapping, *, supernodes: int) -> dict:
    """The run config with `num-clients` = the simulation's SuperNodes when the job left it unset
    (0): plain `flwr run .` is then a federation of Flower's default size. A set value is kept,
    and the ServerApp refuses a federation of another size."""
    mapping = dict(run_config)
    if not int(mapping.get("num-clients") or 0):
        mapping["num-clients"] = supernodes
    return mapping
