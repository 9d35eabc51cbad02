"""The fedtune ClientApp: one per institution, with Flower's SecAgg+ mod when enabled.

`app` is what `flwr run` loads: the job is the coordinator's run config, and the node's privacy
policy comes from its own node config with safe defaults (common/privacy/policy.py); the job
may tighten it, a job that loosens it is refused. `build_client_app` gives the same app bound
to an already-resolved config, as `fedtune simulate` uses it: there the researcher holds every
node, so the run config is the policy (node config keys may still tighten it). `flwr run` on a
simulation federation is the same case: inside Flower's simulation runtime the run config is
bound and the ledgers go under the run's directory (common/flwr_run.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from flwr.app import Context
from flwr.client import Client, ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedtune.client.drills import DrillClient, dropout_mod
from fedtune.client.fl_client import FedtuneClient
from fedtune.client.node_data import NodeData
from fedtune.client.policy_guard import transport_of
from fedtune.client.secure_aggregation import SecAggNode, secure_aggregation_mod
from fedtune.client.trainer import step_progress_file
from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile
from fedtune.common.flwr_run import SIMULATION_ROSTER, flwr_run_dir, in_simulated_node, sized_to_federation
from fedtune.common.ledger.chain import signing_key
from fedtune.common.ledger.receipts import printable
from fedtune.common.privacy.policy import NodePolicy
from fedtune.common.protocol import SecAggWire
from fedtune.common.secure_aggregation.roster import NO_ROSTER, Roster, RosterError

RUN_LOG = logging.getLogger("fedtune.node.run")  # under the node runtime's logger: `fedtune run-node` prints it
MAX_NAMED_RUNS = 1_024  # a coordinator may name a new run each round: the memory of named runs is bounded
_named_runs: set[tuple[str, str]] = set()


def binding(context: Context, config: RunConfig | None,
            ledger_root: Path | None) -> tuple[RunConfig | None, Path | None]:
    """The config and ledger root a simulation binds: `fedtune simulate`'s own, or, for `flwr run`
    in Flower's simulation runtime, the run config and the run directory's ledgers/. A SuperNode
    binds nothing: the job is only a request, and its node config says where it writes. Nor does a
    node whose config names its own data, ledger or roster, or lacks the engine's `num-partitions`,
    even inside a Ray actor: it is an institution, whatever process it runs in."""
    node = context.node_config
    institution = any(key in node for key in ("data", "ledger-dir", "roster"))  # a site's own settings
    if config is not None or institution or "num-partitions" not in node or not in_simulated_node():
        return config, ledger_root
    run_config = sized_to_federation(context.run_config, supernodes=int(node["num-partitions"]))
    job = RunConfig.from_mapping(run_config)
    return job, flwr_run_dir(output_dir=job.output_dir, flower_run_id=context.run_id) / "ledgers"


def _ledger_dir(context: Context, ledger_root: Path | None, client_id: str) -> Path:
    """Where this institution keeps its ledger: its own node config wins, then the run's root."""
    if "ledger-dir" in context.node_config:
        return Path(str(context.node_config["ledger-dir"]))
    if "data" in context.node_config:  # a real institution: its ledger is its own, at a known place
        raise FedtuneError("node config needs 'ledger-dir' (where this institution keeps its signed privacy "
                           "ledger), e.g. ledger-dir='/srv/fedtune/ledger'")
    return (ledger_root or Path("ledgers")) / client_id


def job_of(context: Context, config: RunConfig | None) -> RunConfig:
    """What the coordinator asks (a simulation binds it; a deployment reads Flower's run config)."""
    return config if config is not None else RunConfig.from_mapping(dict(context.run_config))


def policy_of(context: Context, config: RunConfig | None) -> NodePolicy:
    """The node's policy: its node config over safe defaults (over the researcher's run config
    in a simulation, where one party holds every node)."""
    defaults = NodePolicy.of_simulation(config) if config is not None else NodePolicy()
    return NodePolicy.from_node_config(dict(context.node_config), defaults=defaults)


def profile_of(context: Context, config: RunConfig | None) -> ExecutionProfile:
    """Where and in what precision this node trains: its node config's profile keys, over the
    run's in a simulation and over the automatic defaults on a deployed node (the coordinator's
    job never chooses an institution's hardware)."""
    base = config.profile if config is not None else ExecutionProfile()
    return base.overridden_by(dict(context.node_config))


def resolve_config(context: Context, config: RunConfig | None) -> RunConfig:
    """The config this node acts on: the job with the node's policy in force (the job as asked
    when it loosens the policy: every train request is then refused)."""
    policy, job = policy_of(context, config), job_of(context, config)
    return job if policy.loosenings(job) else policy.applied_to(job)


def secagg_node_of(context: Context, config: RunConfig | None, ledger_root: Path | None) -> SecAggNode:
    """Who this node is in secure aggregation: its roster id and identity key, the roster it pinned
    (node config `roster`; a simulation's own), and what is wrong with them, if anything."""
    node = NodeData.from_node_config(dict(context.node_config))
    policy = policy_of(context, config)
    ledger_dir = _ledger_dir(context, ledger_root, node.client_id)
    roster, problem = pinned_roster(context=context, ledger_root=ledger_root, institution=node.client_id,
                                    ledger_dir=ledger_dir)
    return SecAggNode(institution=node.client_id, ledger_dir=ledger_dir, roster=roster, problem=problem,
                      min_contributors=policy.secagg_min_contributors,
                      max_colluders=policy.secagg_max_colluders, policy_record=policy.to_record())


def _roster_path(context: Context, ledger_root: Path | None) -> Path | None:
    if "roster" in context.node_config:
        return Path(str(context.node_config["roster"]))
    if "data" not in context.node_config and ledger_root is not None:  # a simulation: the researcher's roster
        return ledger_root / SIMULATION_ROSTER
    return None


def pinned_roster(*, context: Context, ledger_root: Path | None, institution: str,
                  ledger_dir: Path) -> tuple[Roster | None, str | None]:
    """The roster this node pinned, or why it cannot take part in secure aggregation (one line)."""
    path = _roster_path(context, ledger_root)
    if path is None:
        return None, NO_ROSTER
    try:
        roster = Roster.load(path)
    except RosterError as exc:
        return None, str(exc)
    problem = roster.problem_for(institution=institution,
                                 own_key=signing_key(ledger_dir).public_key().public_bytes_raw())
    return (None, problem) if problem else (roster, None)


def hold_to_gpu_share(config: RunConfig | None, profile: ExecutionProfile) -> None:
    """A simulated client given part of a GPU (gpus-per-client < 1) keeps to that share of its
    memory: Ray only counts shares, so without this two clients on one GPU could each take it all.
    Torch's allocator is capped in this process, a Ray actor (one per client), before the model is
    built. A no-op on the CPU, outside a Ray actor (the in-process engine runs every client in
    the driver) and on a deployed node (no bound config: its hardware is its own)."""
    share = config.gpus_per_client if config is not None else 0.0
    if not 0 < share < 1 or not in_simulated_node():
        return
    import torch

    if not torch.cuda.is_available() or (device := profile.torch_device()).type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(float(share), index)


def client_fn_of(*, config: RunConfig | None, ledger_root: Path | None) -> Callable[[Context], Client]:
    """The institution's client for a message: job, node policy, node data, ledger, transport."""

    def client_fn(context: Context) -> Client:
        node = NodeData.from_node_config(dict(context.node_config))
        bound, root = binding(context, config, ledger_root)
        hold_to_gpu_share(bound, profile_of(context, bound))
        client = FedtuneClient(config=job_of(context, bound), policy=policy_of(context, bound), node=node,
                               transport=transport_of(context), run_id=str(context.run_id),
                               ledger_dir=_ledger_dir(context, root, node.client_id),
                               profile=profile_of(context, bound))
        cfg = client.config
        if cfg.inject_faults and node.partition_id is not None:  # a drill, in simulation only
            return DrillClient(client, config=cfg, partition_id=node.partition_id).to_client()
        return client.to_client()

    return client_fn


def progress_mod(progress_dir: Path):
    """Each client's DP steps into `progress_dir/<client>.json`, for a simulation's status line."""

    def mod(msg, context: Context, call_next):
        client_id = NodeData.from_node_config(dict(context.node_config)).client_id
        with step_progress_file(progress_dir / f"{client_id}.json"):
            return call_next(msg, context)

    return mod


def run_name_mod(msg, context: Context, call_next):
    """The node's log names fedtune's run id (the one its ledger keys records by, and `fedtune receipt`
    takes) beside Flower's, once per run per process, at the first message that names it: a train
    request or a SecAgg+ setup, before the node trains or refuses. Ids only, never a value."""
    flower = str(msg.metadata.run_id)
    for name, record in (msg.content.config_records.items() if msg.has_content() else ()):
        if SecAggWire.RUN_ID in record:  # the key of a fit config and of a SecAgg+ setup alike
            named = record[SecAggWire.RUN_ID]  # read as each reads it; none: Flower's id stands in
            if name == RECORD_KEY_CONFIGS:  # client/secure_aggregation.py's _new_round
                run = named if isinstance(named, str) and named else flower
            else:  # FitInstructions.from_config
                run = str(named or "") or flower
            name_run(run, flower_run_id=flower)
            break
    return call_next(msg, context)


def name_run(run_id: str, *, flower_run_id: str) -> None:
    if (run_id, flower_run_id) in _named_runs:
        return
    if len(_named_runs) >= MAX_NAMED_RUNS:
        _named_runs.clear()
    _named_runs.add((run_id, flower_run_id))
    RUN_LOG.info("fedtune run %s (Flower run %s)", printable(run_id), printable(flower_run_id))


def build_client_app(*, config: RunConfig | None = None, ledger_root: Path | None = None,
                     progress_dir: Path | None = None) -> ClientApp:
    """`ledger_root` holds one ledger directory per client (simulation puts it in the run dir,
    with the simulation's roster); `progress_dir` (simulation only) receives each client's steps."""

    def run_config(context: Context) -> RunConfig:
        return resolve_config(context, binding(context, config, ledger_root)[0])

    def secagg_node(context: Context) -> SecAggNode:
        return secagg_node_of(context, *binding(context, config, ledger_root))

    # The dropout drill wraps SecAgg+, so a node can vanish at any of its stages.
    return ClientApp(client_fn=client_fn_of(config=config, ledger_root=ledger_root),
                     mods=[run_name_mod, dropout_mod(run_config), secure_aggregation_mod(secagg_node),
                           *([progress_mod(progress_dir)] if progress_dir is not None else [])])


app = build_client_app()
