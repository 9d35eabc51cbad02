"""The coordinator's pinned runtime: flower-superlink in process isolation, and this process as
its only SuperExec. AcquireTask is authenticated with a secret only this process holds, so a run
submitted through the (unauthenticated) Control API waits here, and each one starts
fedtune/serverapp_process.py, which refuses it unless it is the pinned app with a signed job.

Flower 1.41 serves its Control API (/v1/control/: `flwr ls`, `run`, `stop`, `supernode list`,
`register`, `unregister`) on the same host and port as the Fleet API (/v1/fleet/), with no
authentication: whoever reaches the port can unregister every institution's node. So the
SuperLink binds loopback unless the operator states (--control-behind-authenticating-proxy) that
a proxy in front of the port authenticates /v1/control/."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import ipaddress
import threading
import time
from pathlib import Path

from common.errors import FedtuneError
from common.trust.gate import RunGate
from fedtune.runtime_api import abbreviated, acquire, acquiring_client, flag_value, write_secret
from fedtune.serverapp_process import TOKEN_ENV

OWNED = ("--isolation", "--superexec-auth-secret-file")
MAX_SERVERAPPS = 4  # ServerApp processes at once; more submitted runs wait in the SuperLink's queue
LOG = logging.getLogger("fedtune.coordinator")
DEFAULT_PORT = "8000"  # flower-superlink's own default for its one HTTPS port (SUPERLINK_UVICORN_DEFAULT_PORT)
BEHIND_PROXY = "--control-behind-authenticating-proxy"  # fedtune's flag, not Flower's: never passed on
# Flower 1.41 starts a second, gRPC Control API (on --control-api-address, 0.0.0.0:9093 by default)
# when this is set in its environment: the SuperLink never gets it from us.
GRPC_CONTROL_ENV = "FLWR_INTERNAL_GRPC_CONTROL_API"


def run_superlink_with_runtime(args: list[str], *, operator_key: Path, state_dir: Path) -> int:
    args = control_api_exposure(args)
    hit = abbreviated(args, OWNED)
    if hit:
        raise FedtuneError(f"run-superlink sets {hit[1]} itself; leave out {hit[0]}")
    RunGate.from_pins(operator_key=operator_key, bindings_dir=state_dir)  # a bad pin stops us before Flower starts
    ca = flag_value(args, "--ssl-ca-certfile")
    if "--insecure" in args or not ca:
        raise FedtuneError("run-superlink needs TLS (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile)")
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    env.pop(GRPC_CONTROL_ENV, None)
    with tempfile.TemporaryDirectory(prefix="fedtune-link-") as scratch:
        secret = write_secret(Path(scratch) / "runtime.secret")
        link = subprocess.Popen(["flower-superlink", *args, "--isolation", "process",
                                 "--superexec-auth-secret-file", str(secret)], env=env)
        stop = threading.Event()
        runtime = threading.Thread(target=_serve, daemon=True, kwargs=dict(
            address=f"{_runtime_host(args)}:{flag_value(args, '--port') or DEFAULT_PORT}", ca=ca,
            secret=secret.read_bytes(), operator_key=operator_key, state_dir=state_dir, stop=stop, env=env))
        runtime.start()
        try:
            while link.poll() is None and runtime.is_alive():
                time.sleep(0.5)
            if not runtime.is_alive():
                LOG.error("the coordinator runtime stopped (its error is above); stopping the SuperLink with it")
                return 1
            return link.returncode
        finally:
            stop.set()
            if link.poll() is None:
                link.terminate()
                link.wait(timeout=30)


def _serve(*, address: str, ca: str, secret: bytes, operator_key: Path, state_dir: Path,
           stop: threading.Event, env: dict) -> None:
    """Start one gated ServerApp process per acquired task, at most MAX_SERVERAPPS at once (anyone
    can submit runs: each refused one still costs a process start); the token never sits in argv."""
    import httpx
    from flwr.supercore.constant import TaskType

    client = acquiring_client(address=address, secret=secret, root_certificates=Path(ca).read_bytes())
    children: list[subprocess.Popen] = []
    while not stop.is_set():
        children = [child for child in children if child.poll() is None]  # reaped: no zombies
        if len(children) >= MAX_SERVERAPPS:
            time.sleep(0.5)
            continue
        try:
            acquired = acquire(client, TaskType.SERVER_APP.value)
        except httpx.HTTPError:  # TLS endpoint not up yet, or going down
            time.sleep(0.5)
            continue
        except Exception:  # noqa: BLE001 - one bad answer must not leave runs queued with no executor
            LOG.exception("coordinator runtime: AcquireTask failed")
            time.sleep(0.5)
            continue
        if acquired is None:
            time.sleep(0.2)
            continue
        children.append(subprocess.Popen(
            [sys.executable, "-m", "fedtune.serverapp_process", address, str(operator_key), str(state_dir), ca],
            env=dict(env, **{TOKEN_ENV: acquired[0]})))
    for child in children:
        if child.poll() is None:
            child.terminate()


def control_api_exposure(args: list[str]) -> list[str]:
    """The SuperLink's arguments without fedtune's BEHIND_PROXY flag; refused (FedtuneError) when
    they would serve the unauthenticated Control API beyond loopback and the flag is absent."""
    behind_proxy = BEHIND_PROXY in args
    args = [arg for arg in args if arg != BEHIND_PROXY]
    host = _bind_host(args)
    if behind_proxy or _is_loopback(host):
        return args
    port = flag_value(args, "--port") or DEFAULT_PORT
    raise FedtuneError(
        f"run-superlink refuses --host {host}: Flower 1.41 serves its Control API on the same port as the Fleet API "
        f"({host}:{port}), without authentication, so anyone who reaches it could list and unregister every "
        f"institution's node and submit or stop runs. Fix: bind --host 127.0.0.1 and put an authenticating "
        f"reverse proxy (TLS) on the public address that forwards /v1/fleet/ to it and /v1/control/ only for "
        f"authenticated operators, then add {BEHIND_PROXY} to say so")


def _bind_host(args: list[str]) -> str:
    """The host flower-superlink binds: the last --host (or an abbreviation argparse takes), else its default."""
    host = "127.0.0.1"
    for index, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if len(name) >= 4 and "--host".startswith(name):  # "--h" alone is ambiguous to Flower's argparse
            host = value if value else (args[index + 1] if index + 1 < len(args) else host)
    return host


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def _runtime_host(args: list[str]) -> str:
    host = flag_value(args, "--host") or "127.0.0.1"
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
