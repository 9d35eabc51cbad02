"""One ServerApp task on the coordinator, in its own process: the gate, then the installed
ServerApp (server/app.py), never the run's bundle. Started by fedtune/coordinator_runtime.py with
the task's token in the environment; mirrors Flower 1.41's flwr-serverapp otherwise (heartbeat,
logs streamed to `flwr run --stream`, the final status pushed back)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TOKEN_ENV = "FEDTUNE_TASK_TOKEN"
REPLY_POLL_S = 0.25  # Flower's HttpGrid waits 3 s between pulls for replies: most of a stage's latency


def prompt_grid(**kwargs):
    """Flower 1.41's HttpGrid, pulling replies every REPLY_POLL_S (over loopback to its own SuperLink)."""
    import time

    from flwr.superlink.grid import HttpGrid

    class PromptGrid(HttpGrid):
        def send_and_receive(self, messages, *, timeout=None):
            waiting = set(self.push_messages(messages))
            end = time.time() + (timeout if timeout is not None else 0.0)
            replies = []
            while timeout is None or time.time() < end:
                pulled = list(self.pull_messages(waiting))
                replies.extend(pulled)
                waiting.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
                if not waiting:
                    break
                time.sleep(REPLY_POLL_S)
            return replies

    return PromptGrid(**kwargs)


def exit_when_orphaned(interval_s: float = 1.0) -> None:
    """End this process once the runtime that started it is gone (re-parented, to PID 1 or a
    subreaper): nobody would stop it any more, and its SuperLink went with the runtime."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print("the coordinator runtime that started this ServerApp is gone: exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def _push_output(grid, request) -> None:
    """The task's final status, unless the task is over already: `flwr stop` finished it and revoked its token."""
    import httpx

    try:
        grid._runtime_client.PushTaskOutput(request)  # pylint: disable=W0212
    except httpx.HTTPStatusError as err:
        if err.response.status_code != 401:
            raise
        print("the run was stopped: its task is over, nothing to report", file=sys.stderr, flush=True)


def main(address: str, operator_key: str, state_dir: str, ca: str) -> int:
    from queue import Queue

    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SubStatus
    from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
    from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest  # pylint: disable=E0611
    from flwr.server.run_serverapp import run as run_server_app
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.logger import mirror_output_to_queue, start_log_uploader, stop_log_uploader
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.common.trust.gate import RunGate

    exit_when_orphaned()
    gate = RunGate.from_pins(operator_key=operator_key, bindings_dir=Path(state_dir))
    log_queue: Queue = Queue()
    mirror_output_to_queue(log_queue)
    grid = prompt_grid(runtime_api_address=address, insecure=False, root_certificates=Path(ca).read_bytes(),
                       token=os.environ[TOKEN_ENV])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))  # pylint: disable=W0212
    heartbeat.start()
    context, uploader, status, details = None, None, SubStatus.FAILED, "the ServerApp failed"
    try:
        task = grid._runtime_client.PullTaskInput(PullTaskInputRequest())  # pylint: disable=W0212
        TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, task.run.run_id
        TaskIdentity.node_id = task.context.node_id
        context, run, fab = context_from_proto(task.context), run_from_proto(task.run), fab_from_proto(task.fab)
        grid.set_run(run)
        uploader = start_log_uploader(log_queue=log_queue, node_id=0, run_id=run.run_id,
                                      client=grid._runtime_client)  # pylint: disable=W0212
        run_config = get_fused_config_from_dir(gate.app.root, run.override_config)
        refusal = gate.refusal(fab_hash=fab.hash_str, fab_content=fab.content, run_config=run_config,
                               run_id=run.run_id)
        if refusal:
            print(f"refused by the coordinator: run {run.run_id} (app {fab.hash_str}): {refusal}", flush=True)
            details = f"refused by the coordinator: {refusal}"
            return 1
        from fedtune.server.app import app  # the installed ServerApp

        context.run_config = run_config
        run_server_app(grid=grid, context=context, server_app_dir=str(gate.app.root), loaded_server_app=app)
        status, details = SubStatus.COMPLETED, ""
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the submitter like Flower's own ServerApp failure
        print(f"ServerApp failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        details = f"ServerApp failed with exception: {exc}"
        return 1
    finally:
        if uploader is not None:  # the last lines reach `flwr run --stream` before the token is spent
            stop_log_uploader(log_queue, uploader)
        _push_output(grid, PushTaskOutputRequest(context=context_to_proto(context) if context else None,
                                                 sub_status=status, details=details))
        heartbeat.stop()
        grid.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
