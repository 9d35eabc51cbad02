"""A federation in one process: the real ServerApp round loop (server/federation.py) talks to the
real ClientApp (client/app.py, every mod) through a Grid that delivers each message by calling
the ClientApp, the way a SuperNode hands a message to `flwr-clientapp`.

No Ray and no sockets: a SecAgg+ round of the tiny model takes about a second, so tests play a
hostile coordinator by editing messages in flight (`tamper`) or check the round loop without the
simulation engine's start-up. Every message is serialized as Flower serializes it, so each node
gets its own copy. Nodes run one after another, and a reply that took a node longer than the
round's timeout is lost, as if the nodes ran side by side. `fedtune simulate --engine in-process`
runs a whole simulation this way (`run_apps`); its crash drill raises `CoordinatorKilled` where a
real coordinator process would be SIGKILLed.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client.app import build_client_app
from fedtune.server.drills import CoordinatorKilled
from fedtune.server.federation import run_federation
from fedtune.server.recorder import RoundCallback
from fedtune.server.run_directory import RunDirectory
from fedtune.simulations.simulate import write_simulation_roster

COORDINATOR_NODE_ID = 1
STRANGER_NODE_ID = 900  # the first of `federation(strangers=...)`'s nodes
Tamper = Callable[[Message], Message | None]  # None: the message is dropped
# fedtune's round loop (Flower's legacy workflows) talks to a grid only through send_and_receive.
_ONLY_SEND_AND_RECEIVE = "the in-process grid delivers messages only through send_and_receive"


class InProcessGrid(Grid):
    def __init__(self, *, client_app, node_configs: dict[int, dict], run_id: int = 5,
                 tamper: Tamper | None = None, node_apps: dict | None = None) -> None:
        self.app, self.run_id, self.tamper = client_app, run_id, tamper
        self.node_apps = dict(node_apps or {})  # node id -> its own ClientApp (e.g. a stranger's)
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=cfg, state=RecordDict(), run_config={})
                         for nid, cfg in node_configs.items()}
        self.sent: list[Message] = []  # after tampering, as the clients received them
        self.replies: list[Message] = []

    def kill_coordinator(self, server_round: int) -> None:
        """The crash drill here: the caller's process must live on, so the round loop is unwound
        by an exception nothing in it catches, and no round-end bookkeeping runs."""
        raise CoordinatorKilled(f"inject-faults: the coordinator is killed after round {server_round}'s replies")

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return SimpleNamespace(run_id=self.run_id)

    def create_message(self, *args, **kwargs):
        raise TypeError(_ONLY_SEND_AND_RECEIVE)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise TypeError(_ONLY_SEND_AND_RECEIVE)

    def pull_messages(self, message_ids):
        raise TypeError(_ONLY_SEND_AND_RECEIVE)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__.update(_message_id=uuid.uuid4().hex, _run_id=self.run_id,
                                         _src_node_id=COORDINATOR_NODE_ID)
            if self.tamper is not None:
                msg = self.tamper(msg)
                if msg is None:
                    continue
            msg = _over_the_wire(msg)  # each node gets its own copy, as serialized by Flower
            self.sent.append(msg)
            started = time.monotonic()
            reply = self._deliver(msg)
            if timeout is None or time.monotonic() - started <= timeout:  # else lost, like a straggler's
                replies.append(_over_the_wire(reply))
        self.replies += replies
        return replies

    def _deliver(self, msg: Message) -> Message:
        try:
            node = msg.metadata.dst_node_id
            return self.node_apps.get(node, self.app)(msg, self.contexts[node])
        except Exception as exc:  # what Flower's runtime makes of a ClientApp's exception
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"),
                           reply_to=msg)


def _over_the_wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


def federation(config, run_dir: Path, *, tamper: Tamper | None = None, client_app=None,
               node_policy: dict[int, dict] | None = None, strangers: int = 0) -> tuple[InProcessGrid, RunDirectory]:
    """A grid of `config.num_clients` simulated nodes (their roster written as `fedtune simulate`
    does) and a fresh run directory; `node_policy` adds node config keys per partition, and
    `client_app` replaces fedtune's. `strangers` registers that many more nodes (ids 900, 901, ...)
    running fedtune's ClientApp with keys and a roster of their own (beside `run_dir`): each claims
    to be client-N, as a stranger who registered a node would."""
    ledgers = run_dir / "ledgers"
    write_simulation_roster(ledgers, num_clients=config.num_clients)
    nodes = {100 + p: {"partition-id": p, "num-partitions": config.num_clients, **(node_policy or {}).get(p, {})}
             for p in range(config.num_clients)}
    node_apps = {}
    if strangers:
        own = run_dir.parent / f"{run_dir.name}-strangers"
        write_simulation_roster(own, num_clients=config.num_clients)
        app = build_client_app(config=config, ledger_root=own)
        for index in range(strangers):
            nodes[STRANGER_NODE_ID + index] = {"partition-id": index % config.num_clients,
                                               "num-partitions": config.num_clients}
            node_apps[STRANGER_NODE_ID + index] = app
    grid = InProcessGrid(client_app=client_app or build_client_app(config=config, ledger_root=ledgers),
                         node_configs=nodes, tamper=tamper, node_apps=node_apps)
    return grid, RunDirectory.create(path=run_dir, config=config)


def run(grid: InProcessGrid, config, run_dir: RunDirectory, *, resume: bool = False,
        on_round: RoundCallback | None = None) -> dict:
    """The ServerApp's main, with the task identity Flower's runtime would set for it; `on_round`
    gets each round's record (e.g. the progress table's `add`)."""
    with _coordinator_identity(grid):
        return run_federation(grid=grid, context=_server_context(grid), config=config, run_dir=run_dir,
                              resume=resume, on_round=on_round)


def run_apps(*, server_app, client_app, num_nodes: int) -> None:
    """What Flower's `run_simulation` does with the two apps, without Ray: `num_nodes` nodes with
    the node config Flower gives simulated ones, and the ServerApp run in this process."""
    nodes = {100 + p: {"partition-id": p, "num-partitions": num_nodes} for p in range(num_nodes)}
    grid = InProcessGrid(client_app=client_app, node_configs=nodes)
    with _coordinator_identity(grid):
        server_app(grid, _server_context(grid))


def _server_context(grid: InProcessGrid) -> Context:
    return Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})


@contextmanager
def _coordinator_identity(grid: InProcessGrid):
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run_id, COORDINATOR_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
