"""The fedtune ClientApp: one per institution, with Flower's SecAgg+ mod when enabled.

`app` is what `flwr run` loads (config from the Flower run config); `build_client_app`
gives the same app bound to an already-resolved config, as `fedtune simulate` uses it.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.client import Client, ClientApp

from client.fl_client import FedtuneClient
from client.secure_aggregation import secure_aggregation_mod
from common.config import RunConfig


def _partition_id(context: Context) -> int:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node config needs 'partition-id' (which share of the data this node holds)")
    return int(node["partition-id"])


def build_client_app(*, config: RunConfig | None = None) -> ClientApp:
    def client_fn(context: Context) -> Client:
        cfg = config if config is not None else RunConfig.from_mapping(context.run_config)
        return FedtuneClient(config=cfg, partition_id=_partition_id(context),
                             state=context.state).to_client()

    def requires_secagg(context: Context) -> bool:
        cfg = config if config is not None else RunConfig.from_mapping(context.run_config)
        return cfg.secure_aggregation

    return ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod(requires_secagg)])


app = build_client_app()
