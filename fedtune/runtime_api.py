"""Talking to a Flower runtime API (a SuperNode's or the SuperLink's) as its only SuperExec.

Flower 1.41 in `--isolation process` leaves executing tasks to an outside process: it polls
`AcquireTask` (HMAC-authenticated with the shared secret, so nobody else can take a task) and gets
a one-task token, with which the task's inputs are pulled and its outputs pushed. fedtune's
runtimes are that process, so what executes is always the party's installed code.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fedtune.common.storage import atomic_write

ACQUIRE_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


def write_secret(path: Path) -> Path:
    """A fresh shared secret for the runtime API, owner-only, for this process's life."""
    atomic_write(path, secrets.token_bytes(32), mode=0o600)
    return path


def acquiring_client(*, address: str, secret: bytes, root_certificates: bytes | None = None):
    """A client that may call AcquireTask on the runtime API at `address`: plain HTTP on a node's
    loopback, TLS with the federation's CA on the SuperLink's one port."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None, root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=ACQUIRE_METHODS)],
        retry_invoker=make_simple_http_retry_invoker())


def task_client(*, address: str, token: str, component: str, root_certificates: bytes | None = None,
                max_tries: int = 5):
    """A client for one acquired task: pull its inputs, push its outputs. Its failures raise here:
    Flower's own retry policy SIGINTs the whole process on a 401 (made for one process per task),
    which would take a long-lived runtime down with one stale token."""
    import httpx
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=2), max_tries=max_tries, max_time=30,
                         recoverable_exceptions=(httpx.TransportError,))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None, root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)


def task_heartbeat(client):
    """A task heartbeat that reports failure instead of SIGINTing the process (Flower's does)."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.heartbeat import HeartbeatSender

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except Exception:  # noqa: BLE001 - a missed beat; the task's own calls say what is wrong
            return False

    return HeartbeatSender(beat)


def task_ended(client) -> bool:
    """Whether the SuperLink says the task behind `client`'s token is over: finished (`flwr stop`
    marks the run's task finished:stopped and revokes its token) or unknown. False when it cannot tell
    (the SuperLink busy or unreachable). A heartbeat: it also keeps a live task's lease, as the task's own does."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

    try:
        return not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
    except httpx.HTTPStatusError as err:
        return err.response.status_code == 401  # the token revoked: the task finished
    except Exception:  # noqa: BLE001 - no answer is not an answer
        return False


def acquire(client, task_type: str) -> tuple[str, object] | None:
    """(token, task) of a pending task of `task_type`, or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module

    response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
    if response.HasField("task") and response.token:
        return response.token, response.task
    return None


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` among command-line `args`, or None."""
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def abbreviated(args: list[str], flags: tuple[str, ...]) -> tuple[str, str] | None:
    """(argument, flag) of the first of `args` that names or abbreviates one of `flags`: Flower's
    argparse takes any unambiguous prefix, and the last of two, so a runner's own flags must not
    be reachable that way either."""
    for arg in args:
        name = arg.split("=")[0]
        if arg.startswith("--") and len(name) > 2:
            hits = [flag for flag in flags if flag.startswith(name)]
            if hits:
                return name, hits[0]
    return None
