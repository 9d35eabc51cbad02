"""The fedtune ClientApp: one per institution, with Flower's SecAgg+ mod when enabled.

`app` is what `flwr run` loads (config from the Flower run config); `build_client_app`
gives the same app bound to an already-resolved config, as `fedtune simulate` uses it.
The node's own privacy keys (node config) override the run config the coordinator sends.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.client import Client, ClientApp

from client.drills import DrillClient, dropout_mod
from client.fl_client import FedtuneClient
from client.node_data import NODE_PRIVACY_KEYS, NodeData
from client.secure_aggregation import secure_aggregation_mod
from common.config import RunConfig
from common.errors import FedtuneError


def _ledger_dir(context: Context, ledger_root: Path | None, client_id: str) -> Path:
    """Where this institution keeps its ledger: its own node config wins, then the run's root."""
    if "ledger-dir" in context.node_config:
        return Path(str(context.node_config["ledger-dir"]))
    if "data" in context.node_config:  # a real institution: its ledger is its own, at a known place
        raise FedtuneError("node config needs 'ledger-dir' (where this institution keeps its signed privacy "
                           "ledger), e.g. ledger-dir='/srv/fedtune/ledger'")
    return (ledger_root or Path("ledgers")) / client_id


def resolve_config(context: Context, config: RunConfig | None) -> RunConfig:
    base = config.to_flower() if config is not None else dict(context.run_config)
    own = {key: context.node_config[key] for key in NODE_PRIVACY_KEYS if key in context.node_config}
    return RunConfig.from_mapping({**base, **own})


def build_client_app(*, config: RunConfig | None = None, ledger_root: Path | None = None) -> ClientApp:
    """`ledger_root` holds one ledger directory per client (simulation puts it in the run dir)."""

    def client_fn(context: Context) -> Client:
        cfg = resolve_config(context, config)
        node = NodeData.from_node_config(dict(context.node_config))
        client = FedtuneClient(config=cfg, node=node, run_id=str(context.run_id),
                               ledger_dir=_ledger_dir(context, ledger_root, node.client_id))
        if cfg.inject_faults and node.partition_id is not None:  # a drill, in simulation only
            return DrillClient(client, config=cfg, partition_id=node.partition_id).to_client()
        return client.to_client()

    def run_config(context: Context) -> RunConfig:
        return resolve_config(context, config)

    # The dropout drill wraps SecAgg+, so a node can vanish at any of its stages.
    return ClientApp(client_fn=client_fn, mods=[
        dropout_mod(run_config),
        secure_aggregation_mod(lambda context: run_config(context).secure_aggregation)])


app = build_client_app()
