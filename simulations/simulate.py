"""`fedtune simulate`: a whole federation on one machine (Flower simulation engine, Ray)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from rich.console import Console

from fedtune.common.config import RunConfig
from fedtune.common.counts import counted, rounds_from_1
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import cores_given
from fedtune.common.privacy.plan import PrivacyPlan, plan_of_config
from fedtune.common.privacy.policy import NodePolicy
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks import get_task
from fedtune.server.checkpoint import Checkpoint
from fedtune.server.run_directory import RunDirectory, default_run_dir, write_simulation_roster
from fedtune.server.round_table import RoundTable, log_console, run_banner
from fedtune.simulations.interrupt import StopOnInterrupt
from fedtune.simulations.progress import PROGRESS_DIR, RoundProgress

RAY, IN_PROCESS = "ray", "in-process"
ENGINES = (RAY, IN_PROCESS)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}


def preflight(config: RunConfig, console: Console) -> None:
    """Everything a user can get wrong, checked before Ray starts: data, model, privacy plan."""
    splits = federated_splits(config)
    console.print(f"[dim]{splits.report}[/dim]")
    get_task(config.task).model_path(config.model)
    if config.dp:
        for cid, client in enumerate(splits.clients):
            problem = NodePolicy.of_simulation(config).delta_problem(delta=config.target_delta,
                                                                     num_examples=len(client.train))
            if problem:  # every client would refuse every round: say so before Ray starts
                raise FedtuneError(f"client-{cid}: {problem}")
            plan = plan_of_config(config, num_examples=len(client.train))
            if cid == 0:
                console.print(f"[dim]{config.training_mode}: client-0 {_plan_line(plan)}[/dim]")


def _plan_line(plan: PrivacyPlan) -> str:
    line = (f"DP-SGD noise multiplier {plan.noise_multiplier:.3f}, sample rate {plan.sample_rate:.4f}, "
            f"{counted(plan.steps_per_round, 'step')}/round")
    if plan.probe is None:
        return line
    return (f"{rounds_from_1(plan.probe.rounds, kind='probe round')}: noise multiplier {plan.probe.noise_multiplier:.3f}, full batch, "
            f"{counted(plan.probe.steps_per_round, 'step')}/round; then {line}")


def _hide_injected_faults(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not any(mark in text for mark in ("InjectedFault", "inject-faults", "processing a message by RayBackend"))


def check_out_dir(run_dir: Path, *, resume: bool) -> None:
    """A run directory to resume, or a folder a new run may write into: absent, empty, or a run
    that never finished a round. Never an unrelated folder whose files would be mixed with a run's."""
    if resume:
        RunDirectory.open_existing(run_dir)  # fails early, before Ray starts
    elif (run_dir / "metrics.jsonl").exists():
        raise FedtuneError(f"{run_dir} already holds a run; choose another --out, or --resume it")
    elif run_dir.exists() and not run_dir.is_dir():
        raise FedtuneError(f"--out {run_dir} is a file; choose a folder")
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "run.json").is_file():
        raise FedtuneError(f"--out {run_dir} is a non-empty folder that is not a fedtune run; choose a new "
                           f"or empty folder")


def simulate(*, config: RunConfig, out: Path | None = None, verbose: bool = False,
             console: Console | None = None, resume: bool = False, progress: bool = True,
             on_run_dir: Callable[[Path], None] | None = None, engine: str = RAY) -> dict:
    """Run the federation and return its summary; writes the run directory `out`.

    With `resume`, `out` is an interrupted run (see `simulations.resume`) continued from its checkpoint.
    `progress` shows a status line inside each round on a terminal; `on_run_dir` learns the
    run directory (the CLI logs an unexpected error there). `engine` is RAY (Flower's simulation
    engine) or IN_PROCESS (simulations/inprocess.py: the same apps, nodes one after another here).
    """
    if engine not in ENGINES:
        raise FedtuneError(f"no simulation engine {engine!r}; choose one of {', '.join(ENGINES)}")
    check_engine(config, engine)
    console = console or log_console()
    os.environ.update(OFFLINE_ENV)
    run_dir = Path(out or config.output_dir or default_run_dir())
    check_out_dir(run_dir, resume=resume)
    if on_run_dir is not None:
        on_run_dir(run_dir)
    preflight(config, console)
    # The engine and both apps load only once the checks above passed: a mistake in the config, the
    # data or the run directory is reported in a second, not after Ray, Flower and the apps load.
    from fedtune.client.app import build_client_app
    from fedtune.server.app import build_server_app

    if not verbose:  # the table says what matters; Flower's INFO/WARNING lines are for --verbose
        logging.getLogger("flwr").setLevel(logging.ERROR)
        if config.inject_faults:  # a drill's vanishing clients are reported by the table, not tracebacks
            logging.getLogger("flwr").addFilter(_hide_injected_faults)
    table = RoundTable.for_run(config, console)
    results: dict = {}
    console.print(run_banner(config, run_dir=run_dir), highlight=False)
    if resume:
        checkpoint = Checkpoint.load(run_dir)
        done = checkpoint.completed_round if checkpoint else 0
        console.print(f"Resuming {run_dir} after round {done} (its last checkpoint); rounds {done + 1}.."
                      f"{config.num_rounds} follow")
        for record in checkpoint.rounds if checkpoint else []:
            table.add(record)
    if config.secure_aggregation:
        write_simulation_roster(run_dir / "ledgers", num_clients=config.num_clients)
    shown = RoundProgress(run_dir / PROGRESS_DIR, console, clients=config.clients_per_round,
                          first_round=len(table.rows) + 1, enabled=progress)
    server_app = build_server_app(config=config, run_dir=run_dir, on_round=shown.wrap(table.add), results=results,
                                  resume=resume)
    client_app = build_client_app(config=config, ledger_root=run_dir / "ledgers", progress_dir=run_dir / PROGRESS_DIR)
    with StopOnInterrupt(run_dir, num_rounds=config.num_rounds), shown:
        _run_engine(engine, server_app=server_app, client_app=client_app, num_nodes=config.num_clients,
                    backend_config=ray_backend_config(config, verbose=verbose), verbose=verbose)
    shown.remove_files()
    if "summary" not in results:
        raise FedtuneError(f"the simulation ended without finishing the run; see the log above "
                           f"(rerun with --verbose) and {run_dir}")
    return results["summary"]


def check_engine(config: RunConfig, engine: str) -> None:
    """The simulation keys the engine and this machine can honour, checked before Ray starts: a
    cluster address needs the Ray engine; a GPU share needs a GPU torch sees here, unless the
    clients run on a cluster's nodes (whose GPUs this driver need not have)."""
    if config.ray_address and engine == IN_PROCESS:
        raise FedtuneError(f"ray-address = {config.ray_address!r} runs the clients on a Ray cluster, which needs the "
                           f"Ray engine; drop --engine {IN_PROCESS} (or set ray-address = \"\" to run here)")
    if config.gpus_per_client > 0 and not config.ray_address:
        import torch

        if not torch.cuda.is_available():
            raise FedtuneError(f"gpus-per-client = {config.gpus_per_client:g} gives each simulated client a share of "
                               f"a GPU, but torch sees no CUDA GPU here; set gpus-per-client = 0 (or ray-address to "
                               f"a cluster whose nodes have GPUs)")


def cpus_per_client(config: RunConfig) -> int:
    """Each simulated client's share of the cores, and so its torch threads (Ray sets a worker's
    OMP_NUM_THREADS to its share): `threads` when set. Else, on this machine, its cores split over
    the clients that train at once, one at least. One client per core beats one client at a time on
    every core under Ray: the demo's first round took 31.9 s with two 1-thread actors and 64.5 s
    with one 2-thread actor (the driver's polling takes CPU that threads in lock step wait for).
    Attached to a cluster (`ray_address`), this machine's cores say nothing of the nodes' (a share
    larger than a node would leave Flower's actor pool empty): one core per client unless `threads`
    says more; Flower sizes its pool to the cluster's CPUs (and GPUs) over each client's share."""
    if config.ray_address:
        return config.threads or 1
    cores = cores_given()
    return min(cores, config.threads or max(1, cores // config.clients_per_round))


def ray_backend_config(config: RunConfig, *, verbose: bool) -> dict:
    """Flower's Ray backend settings: each client's cores and GPU share (`client_resources`, the
    resources of its Ray actor), and the arguments Flower's RayBackend passes to `ray.init`
    (`init_args`). `address` is the cluster to attach to, or 'local': a Ray started here and
    stopped at the end, never one Ray would otherwise find through RAY_ADDRESS or a `ray start`
    on this machine. Flower ends with `ray.shutdown()`, which only disconnects from a cluster."""
    return {"client_resources": {"num_cpus": cpus_per_client(config), "num_gpus": float(config.gpus_per_client)},
            "init_args": {"address": config.ray_address or "local", "logging_level": logging.ERROR,
                          "log_to_driver": verbose, "include_dashboard": False}}


def _run_engine(engine: str, *, server_app, client_app, num_nodes: int, backend_config: dict, verbose: bool) -> None:
    if engine == IN_PROCESS:
        from fedtune.simulations.inprocess import run_apps

        run_apps(server_app=server_app, client_app=client_app, num_nodes=num_nodes)
        return
    from flwr.simulation import run_simulation  # Ray loads only for its engine

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                   backend_config=backend_config, verbose_logging=verbose)
