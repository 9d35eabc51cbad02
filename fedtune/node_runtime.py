"""The institution's long-lived node runtime: the SuperNode's only executor.

It takes each ClientApp task from the SuperNode's runtime API and runs it in this process with
the ClientApp of the fedtune installed here (imported once), never code from the run's bundle.
Before anything of a run executes it passes the gate (common/trust/gate.py): the run's app must
be the one installed here, its config a job the pinned operator signed, once. A refused message
gets an error reply naming the mismatch, and nothing else of the node's. Between messages the
process keeps what a run loaded (the base model, the tokenizer, the encoded data: see
common/models/host.py and the data caches in client/), so stages that do not train cost
milliseconds, not a process start and a model load.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.common.trust.gate import RunGate

LOG = logging.getLogger("fedtune.node")
# Between AcquireTask calls when nothing is pending: 0.05 s after a task (the next message of a
# round often follows at once), doubling to 0.4 s while idle. The SuperNode itself pulls from the
# SuperLink every 3 s when idle, so the longer wait adds little latency; polling 20 times a second
# for hours kept the runtime and its SuperNode at about a tenth of a core each.
IDLE_POLL_S, IDLE_POLL_MAX_S = 0.05, 0.4


@dataclass
class TaskTiming:
    run_id: int
    message_type: str
    stage: str
    seconds: float  # from inputs pulled to reply pushed
    refused: bool


@dataclass
class NodeRuntime:
    address: str  # the SuperNode's runtime API, host:port on loopback
    secret: bytes  # shared with the SuperNode (--superexec-auth-secret-file)
    gate: RunGate
    node_config: dict  # as run-node parsed and check-node checked it: the only node config a task sees
    timings_file: Path | None = None  # one JSON line per task (benchmarks)
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        import httpx
        from flwr.supercore.constant import TaskType

        from fedtune.client.app import app  # the installed ClientApp: imported once, for every run
        from fedtune.runtime_api import acquire, acquiring_client

        LOG.info("node runtime: serving the installed app %s", self.gate.app.sha256)
        client = acquiring_client(address=self.address, secret=self.secret)
        self._stop_retrying(client)
        idle = IDLE_POLL_S
        try:
            while not self.stop.is_set():
                try:
                    acquired = acquire(client, TaskType.CLIENT_APP.value)
                except httpx.HTTPError:  # the SuperNode's API is not up yet, or is going down
                    time.sleep(0.5)
                    continue
                if acquired is None:
                    time.sleep(idle)
                    idle = min(idle * 2, IDLE_POLL_MAX_S)
                    continue
                idle = IDLE_POLL_S
                try:
                    self._record(self.handle(app, token=acquired[0]))
                except Exception:  # noqa: BLE001 - one broken task must not stop the node
                    LOG.exception("node runtime: a task failed")
        finally:
            client.close()

    def _stop_retrying(self, client) -> None:
        """Flower's retries of AcquireTask wait on `stop` and give up once it is set: while the SuperNode
        goes down (Ctrl-C, SIGTERM) they would otherwise go on, a 'retrying' line each, and hold run-node
        up. The serve loop's own 0.5 s polls cover a SuperNode not up yet, without a line."""
        invoker = getattr(client, "_retry_invoker", None)
        if invoker is None:
            return
        giveup, gave_up = invoker.should_giveup or (lambda _exc: False), invoker.on_giveup
        invoker.should_giveup = lambda exc: self.stop.is_set() or giveup(exc)
        invoker.on_giveup = lambda state: None if self.stop.is_set() or gave_up is None else gave_up(state)
        invoker.wait_function = self.stop.wait

    def handle(self, app, *, token: str) -> TaskTiming:
        """One message: pull, gate, run the installed ClientApp (or refuse), push the reply. Every
        pulled message gets a reply: Flower's SuperNode waits for one before it pulls the next."""
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        from fedtune.runtime_api import task_client, task_heartbeat

        client = task_client(address=self.address, token=token, component="flwr-clientapp")
        heartbeat = task_heartbeat(client)
        heartbeat.start()
        context, status, details = None, SubStatus.FAILED, "the node runtime could not read the task"
        try:
            message, context, run, fab = pull_task_input(client)
            context.node_config = dict(self.node_config)  # the config run-node checked, whatever the API says
            started = time.monotonic()
            try:
                refusal = self.gate.refusal(fab_hash=fab.hash_str, fab_content=fab.content,
                                            run_config=dict(context.run_config), run_id=run.run_id)
                if refusal:
                    LOG.warning("refused run %d (app %s): %s", run.run_id, fab.hash_str, refusal)
                    reply, details = _error_reply(message, f"refused by the node: {refusal}"), refusal
                else:
                    reply = _run_app(app, message, context)
                    status, details = ((SubStatus.COMPLETED, "") if not reply.has_error()
                                       else (status, "ClientApp error"))
            except Exception:  # noqa: BLE001 - e.g. an unreadable jobs.json: say so here, refuse there
                LOG.exception("node runtime: run %d could not be checked", run.run_id)
                refusal = "the node could not check this run; its own log says why"
                reply, details = _error_reply(message, f"refused by the node: {refusal}"), refusal
            push_message(client, reply, context)
            return TaskTiming(run_id=run.run_id, message_type=message.metadata.message_type,
                              stage=_stage_of(message), seconds=time.monotonic() - started, refused=bool(refusal))
        finally:
            heartbeat.stop()  # before the output is pushed: that ends the token a late beat would use
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()

    def _record(self, timing: TaskTiming) -> None:
        LOG.info("run %d: %s %s answered in %.3f s%s", timing.run_id, timing.message_type, timing.stage,
                 timing.seconds, " (refused)" if timing.refused else "")
        if self.timings_file is not None:
            from fedtune.common.models import host

            with self.timings_file.open("a") as out:
                out.write(json.dumps({**timing.__dict__, "model_loads": host.base_loads}) + "\n")


def configure_logging() -> None:
    """The runtime's lines (refusals with the app's hash, per-message timings) in the node's log, each
    once: Opacus puts a handler on the root logger when imported, so a logger with its own handler
    (ours, and Flower's in this process) must not also propagate there."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(name)s: %(message)s"))
    for name in ("fedtune.node", "fedtune.models"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(handler)
    logging.getLogger("flwr").propagate = False  # its console handler prints each line once


def _run_app(app, message, context):
    """The installed ClientApp on one message; an exception becomes Flower's usual error reply
    (its text is the app's own, written to carry no data values: see client/fl_client.py)."""
    try:
        return app(message=message, context=context)
    except Exception as exc:  # noqa: BLE001 - the reply says what failed; the process serves on
        LOG.exception("ClientApp raised")
        return _error_reply(message, f"{type(exc)}:<'{exc}'>")


def _error_reply(message, reason: str):
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def _stage_of(message) -> str:
    """The SecAgg+ stage a message carries (setup, share keys, collect masked vectors, unmask), or ''."""
    if message.has_error():
        return ""
    for record in message.content.config_records.values():
        if "stage" in record:
            return str(record["stage"])
    return ""
