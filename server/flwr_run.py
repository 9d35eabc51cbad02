"""`flwr run`'s ServerApp: the job from Flower's run config, outputs in one run directory, and the
same round table and summary JSON as `fedtune simulate` (streamed with `flwr run --stream`).

On a simulation federation (Flower's in-memory grid) one researcher holds every node: the
ServerApp checks that the federation has `num-clients` SuperNodes and writes the clients' keys
and roster under the run directory, where the simulated ClientApps keep their ledgers
(common/flwr_run.py). In a deployment it does neither: institutions keep their own keys and pin
their own roster; with the job's `roster`, an unset num-clients is the roster's member count, and a
larger one is kept with a warning (deployment_config).
"""

from __future__ import annotations

import json
import logging
import time

from flwr.app import Context
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from rich.console import Console
from rich.markup import escape

from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.flwr_run import flwr_run_dir, sized_to_federation
from fedtune.common.secure_aggregation.roster import Roster
from fedtune.server.federation import run_federation
from fedtune.server.round_table import RoundTable, log_console, run_banner
from fedtune.server.run_directory import RunDirectory, write_simulation_roster

NODE_WAIT_S = 60.0  # the simulation engine registers its SuperNodes while the ServerApp loads


def run_flwr_job(*, grid: Grid, context: Context, console: Console | None = None) -> dict:
    """Run the job `flwr run` submitted and print its table and summary; returns the summary."""
    console = console or log_console()
    # Opacus configures the root logger on import, so every Flower record (DEBUG included) would
    # print twice; Flower's own handler on "flwr" still prints each INFO line once.
    logging.getLogger("flwr").propagate = False
    try:
        return _run(grid=grid, context=context, console=console)
    except FedtuneError as exc:  # one line the user can act on, above Flower's own report
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise


def _run(*, grid: Grid, context: Context, console: Console) -> dict:
    simulated = isinstance(grid, InMemoryGrid)  # only Flower's simulation runtime makes one
    config = simulation_config(grid, context.run_config) if simulated else deployment_config(context.run_config)
    path = flwr_run_dir(output_dir=config.output_dir, flower_run_id=context.run_id).absolute()
    directory = RunDirectory.create(path=path, config=config)
    if simulated and config.secure_aggregation:
        write_simulation_roster(path / "ledgers", num_clients=config.num_clients)
    console.print(run_banner(config, run_dir=path, verb="Simulating" if simulated else "Coordinating"),
                  highlight=False, soft_wrap=True)
    table = RoundTable.for_run(config, console)
    summary = run_federation(grid=grid, context=context, config=config, run_dir=directory, on_round=table.add)
    console.print_json(json.dumps(summary))
    return summary


def simulation_config(grid: Grid, run_config, *, wait_s: float = NODE_WAIT_S) -> RunConfig:
    """A simulation's SuperNodes are its clients (partition N is SuperNode N's data): an unset
    num-clients takes their number, a set one must equal it (Flower's default is 2 SuperNodes)."""
    count = settled_node_count(grid, wait_s=wait_s)
    config = RunConfig.from_mapping(sized_to_federation(run_config, supernodes=count))
    if count != config.num_clients:
        raise FedtuneError(
            f"this simulation federation has {count} SuperNodes but num-clients={config.num_clients}: run "
            f"`flwr run . --federation-config num-supernodes={config.num_clients}`, or drop num-clients from "
            f"--run-config to train on {count}")
    return config


def deployment_config(run_config) -> RunConfig:
    """A deployment's federation is its roster's institutions: an unset num-clients (0) takes their
    number; a larger one is warned about (the wait for nodes gives up after NODE_WAIT_LIMIT_S).
    Without a roster, num-clients is the job's (or the task's)."""
    roster = str(run_config.get("roster") or "")
    if not roster:
        return RunConfig.from_mapping(run_config)
    members = sorted(Roster.load(roster).members)
    config = RunConfig.from_mapping(sized_to_federation(run_config, supernodes=len(members)))
    if config.num_clients > len(members):  # a warning, not a refusal: sampling every registered node
        # (strangers too, each dropped at SecAgg+ setup) is how a coordinator keeps them out of a round
        flower_log(logging.WARNING, "num-clients=%d but the roster lists %d institutions (%s): at most %d of the "
                   "%d nodes a round waits for can train; drop num-clients to train with the roster's %d",
                   config.num_clients, len(members), ", ".join(members), len(members), config.num_clients,
                   len(members))
    flower_log(logging.INFO, "federation: %d of the roster's institutions (%s)", config.num_clients, ", ".join(members))
    return config


def settled_node_count(grid: Grid, *, wait_s: float, interval_s: float = 0.5) -> int:
    """The number of registered nodes once it stops changing (0 if none registered within wait_s)."""
    deadline, last = time.monotonic() + wait_s, -1
    while True:
        count = len(list(grid.get_node_ids()))
        if (count and count == last) or time.monotonic() > deadline:
            return count
        last = count
        time.sleep(interval_s)
