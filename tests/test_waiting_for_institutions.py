"""Issue 34: a deployment waited forever, silently, for num-clients=5 nodes of a three-institution
federation. The federation's size follows the roster, the coordinator says whom it waits for (in
Flower's log, which `flwr run --stream` shows), and it gives up after a limit with that message.

Fast: a fake client manager for the wait, the in-process grid for the round loop, and the
ServerApp's `flwr run` entry with the federation itself stubbed out for the sizing.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import threading
import time
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import Context, RecordDict
from rich.console import Console

from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.secure_aggregation.roster import Roster
from fedtune.server import flwr_run, node_identities
from fedtune.server.node_identities import NodeIdentities
from fedtune.simulations.inprocess import federation, run

INSTITUTIONS = ("hospital-a", "hospital-b", "hospital-c")


def _roster() -> Roster:
    keys = {name: Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            for name in INSTITUTIONS}
    return Roster.of_members(keys, federation="issue-34", expires=dt.date.today() + dt.timedelta(days=30))


class _Nodes:
    """A client manager with `connected` node ids; each `wait_for` waits its timeout (or until
    `arrive_after` seconds have passed, when the nodes in `arriving` connect)."""

    def __init__(self, connected, *, arriving=(), arrive_after: float | None = None) -> None:
        self.connected, self.arriving, self.started = list(connected), list(arriving), time.monotonic()
        self.arrive_after = arrive_after

    def _update(self) -> None:
        if self.arrive_after is not None and time.monotonic() - self.started >= self.arrive_after:
            self.connected += [n for n in self.arriving if n not in self.connected]

    def num_available(self) -> int:
        self._update()
        return len(self.connected)

    def all(self) -> dict:
        self._update()
        return {str(n): SimpleNamespace(node_id=n) for n in self.connected}

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        time.sleep(min(timeout, 0.05))
        return self.num_available() >= num_clients


@pytest.fixture
def flower_log():
    """Flower's own log records (what `flwr run --stream` shows), as text."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.fixture
def short_wait(monkeypatch):
    monkeypatch.setattr(node_identities, "NODE_WAIT_LIMIT_S", 0.4, raising=False)
    monkeypatch.setattr(node_identities, "NODE_WAIT_REPORT_S", 0.1, raising=False)


def test_the_wait_names_the_institutions_not_connected_and_gives_up_with_them(flower_log, short_wait):
    identities = NodeIdentities(roster=_roster(), members={11: "hospital-a"})  # identified in an earlier round
    started = time.monotonic()
    with pytest.raises(FedtuneError) as raised:
        identities.sample(_Nodes([11]), 3, min_available=3)
    assert time.monotonic() - started < 5
    waiting = [line for line in flower_log if line.startswith("waiting")]
    assert len(waiting) >= 3  # at once, then every NODE_WAIT_REPORT_S
    assert set(waiting) == {"waiting for 2 of 3 institutions: hospital-b, hospital-c (connected: hospital-a)"}
    assert str(raised.value).startswith("gave up after waiting 0.4 s for the federation's nodes: hospital-b, "
                                        "hospital-c did not connect (connected: hospital-a)")
    assert str(raised.value) in flower_log


def test_before_identification_the_wait_counts_nodes_and_names_the_roster(flower_log, short_wait):
    identities = NodeIdentities(roster=_roster())
    with pytest.raises(FedtuneError, match=r"2 of 3 node\(s\) did not connect \(1 connected; roster: hospital-a, "
                                           r"hospital-b, hospital-c\)"):
        identities.sample(_Nodes([11]), 3, min_available=3)
    assert "waiting for 2 more node(s) (1 connected; roster: hospital-a, hospital-b, hospital-c)" in flower_log


def test_the_wait_ends_when_the_missing_nodes_connect(flower_log, monkeypatch):
    monkeypatch.setattr(node_identities, "NODE_WAIT_LIMIT_S", 30.0, raising=False)
    monkeypatch.setattr(node_identities, "NODE_WAIT_REPORT_S", 0.1, raising=False)
    identities = NodeIdentities(roster=_roster(), members={11: "hospital-a"})
    chosen = identities.sample(_Nodes([11], arriving=[12, 13], arrive_after=0.3), 3, min_available=3)
    assert sorted(p.node_id for p in chosen) == [11, 12, 13]
    assert "waiting for 2 of 3 institutions: hospital-b, hospital-c (connected: hospital-a)" in flower_log


def test_the_round_loop_gives_up_when_institutions_never_connect(tiny_config, tmp_path, short_wait, flower_log):
    """In process: one node of a three-institution simulation is up; the run ends with the message
    instead of Flower's silent 24-hour wait (a thread, so that the old behaviour fails, not hangs)."""
    config = tiny_config(num_clients=3, clients_per_round=3, num_rounds=1, dp=False, secure_aggregation=True)
    grid, run_dir = federation(config, tmp_path / "run")
    del grid.contexts[101], grid.contexts[102]
    outcome: dict = {}

    def coordinate() -> None:
        try:
            run(grid, config, run_dir)
        except FedtuneError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=coordinate, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the coordinator is still waiting for nodes"
    assert outcome["error"].startswith("gave up after waiting 0.4 s for the federation's nodes: 2 of 3 node(s) "
                                       "did not connect (1 connected; roster: client-0, client-1, client-2)")
    assert "waiting for 2 more node(s) (1 connected; roster: client-0, client-1, client-2)" in flower_log
    assert not grid.sent  # nothing was sent to the one node: no round started


def _deployment_job(tmp_path, monkeypatch, **keys):
    """The ServerApp's `flwr run` entry on a deployment grid, the federation itself stubbed: returns
    the config the run would have used."""
    roster = tmp_path / "roster.json"
    _roster().write(roster)
    seen: dict = {}

    def federation_stub(*, config, **_):
        seen["config"] = config
        return {}

    monkeypatch.setattr(flwr_run, "run_federation", federation_stub)
    run_config = RunConfig(output_dir=str(tmp_path / "run"), roster=str(roster)).to_flower()
    run_config.update(keys)
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    flwr_run.run_flwr_job(grid=SimpleNamespace(), context=context, console=Console(file=io.StringIO()))
    return seen["config"]


def test_a_deployment_without_num_clients_is_the_roster_size(tmp_path, monkeypatch):
    config = _deployment_job(tmp_path, monkeypatch, **{"num-clients": 0, "clients-per-round": 0})
    assert (config.num_clients, config.clients_per_round) == (3, 3)
    config = _deployment_job(tmp_path, monkeypatch, **{"num-clients": 2, "clients-per-round": 0})
    assert (config.num_clients, config.clients_per_round) == (2, 2)  # a set one up to the roster's is kept


def test_a_deployment_warns_of_more_clients_than_the_roster_lists(tmp_path, monkeypatch, caplog):
    """Kept, with a warning in Flower's log: sampling more nodes than institutions is how a coordinator
    samples a stranger's registered node too and drops it at setup (tests/test_control_api.py)."""
    with caplog.at_level("WARNING", logger="flwr"):
        config = _deployment_job(tmp_path, monkeypatch, **{"num-clients": 5, "clients-per-round": 0})
    assert config.num_clients == 5
    assert "num-clients=5 but the roster lists 3 institutions (hospital-a, hospital-b, hospital-c)" in caplog.text
