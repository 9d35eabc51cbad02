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
import signal
import subprocess
import sys
import tempfile
import ipaddress
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.trust.gate import RunGate
from fedtune.runtime_api import (abbreviated, acquire, acquiring_client, flag_value, task_client, task_ended,
                                 write_secret)
from fedtune.serverapp_process import TOKEN_ENV

OWNED = ("--isolation", "--superexec-auth-secret-file")
MAX_SERVERAPPS = 4  # ServerApp processes at once; more submitted runs wait in the SuperLink's queue
LOG = logging.getLogger("fedtune.coordinator")
DEFAULT_PORT = "8000"  # flower-superlink's own default for its one HTTPS port (SUPERLINK_UVICORN_DEFAULT_PORT)
BEHIND_PROXY = "--control-behind-authenticating-proxy"  # fedtune's flag, not Flower's: never passed on
# Flower 1.41 starts a second, gRPC Control API (on --control-api-address, 0.0.0.0:9093 by default)
# when this is set in its environment: the SuperLink never gets it from us.
GRPC_CONTROL_ENV = "FLWR_INTERNAL_GRPC_CONTROL_API"
PROBE_S = 1.0  # how often the runtime asks the SuperLink whether each ServerApp's run is still on (`flwr stop`)
EXIT_GRACE_S = 3.0  # a ServerApp whose task ended may still be exiting by itself; then SIGTERM
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL


def run_superlink_with_runtime(args: list[str], *, operator_key: Path, state_dir: Path) -> int:
    args = control_api_exposure(args)
    hit = abbreviated(args, OWNED)
    if hit:
        raise FedtuneError(f"run-superlink sets {hit[1]} itself; leave out {hit[0]}")
    RunGate.from_pins(operator_key=operator_key, bindings_dir=state_dir)  # a bad pin stops us before Flower starts
    ca = flag_value(args, "--ssl-ca-certfile")
    if "--insecure" in args or not ca:
        raise FedtuneError("run-superlink needs TLS (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile)")
    state_dir.mkdir(parents=True, exist_ok=True)
    database = flag_value(args, "--database")
    if database and database != ":memory:":  # Flower's own error for a missing folder is a page of sqlalchemy
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    env.pop(GRPC_CONTROL_ENV, None)
    with tempfile.TemporaryDirectory(prefix="fedtune-link-") as scratch, _signals_exit():
        secret = write_secret(Path(scratch) / "runtime.secret")
        apps, stop, link = ServerApps(), threading.Event(), None
        runtime = threading.Thread(target=_serve, daemon=True, kwargs=dict(
            address=f"{_runtime_host(args)}:{flag_value(args, '--port') or DEFAULT_PORT}", ca=ca,
            secret=secret.read_bytes(), operator_key=operator_key, state_dir=state_dir, stop=stop, env=env,
            apps=apps))
        runtime.start()  # it waits for the SuperLink's port
        try:
            link = subprocess.Popen(["flower-superlink", *args, "--isolation", "process",
                                     "--superexec-auth-secret-file", str(secret)], env=env)
            while link.poll() is None and runtime.is_alive():
                time.sleep(0.5)
            if not runtime.is_alive():
                LOG.error("the coordinator runtime stopped (its error is above); stopping the SuperLink with it")
                return 1
            return link.returncode
        finally:  # every process this one started ends with it: none is left to PID 1
            _hold_signals()
            stop.set()
            end_processes([*([link] if link else []), *apps.close()], grace=KILL_GRACE_S)
            runtime.join(timeout=5)


@contextmanager
def _signals_exit():
    """SIGTERM and SIGHUP end this process like Ctrl-C does (through every `finally`), not at once:
    Python's default for them would leave flower-superlink and the ServerApps running, re-parented to PID 1."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, leave)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _hold_signals() -> None:
    """Ignore a second Ctrl-C or SIGTERM while this process ends its children (bounded by KILL_GRACE_S):
    one that cut the cleanup short would leave them running."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


def end_processes(popens: list[subprocess.Popen], *, grace: float) -> None:
    """SIGTERM to each of `popens` still running, SIGKILL to any still running `grace` seconds later; all reaped."""
    for popen in popens:
        if popen.poll() is None:
            popen.terminate()
    deadline = time.monotonic() + grace
    for popen in popens:
        try:
            popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


class ServerApps:
    """The ServerApp processes the runtime started, each with its run's task token. Every PROBE_S
    the runtime asks the SuperLink, with that token, whether each task is still on: a run stopped
    (`flwr stop`) has its task finished and its token revoked, and its process gets EXIT_GRACE_S to
    exit by itself, then SIGTERM, then SIGKILL after KILL_GRACE_S. `close` hands all of them over to end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._live: list[dict] = []

    def __len__(self) -> int:
        return len(self._live)

    def start(self, command: list[str], *, env: dict, probe, run_id: int) -> bool:
        with self._lock:
            if self._closed:
                return False
            popen = subprocess.Popen(command, env=env)
            self._live.append(dict(popen=popen, probe=probe, run_id=run_id, probed=time.monotonic(), ended=None))
            return True

    def check(self) -> None:
        """Reap the exited (no zombies) and end those whose run is over. The SuperLink is asked
        outside the lock: a slow answer must not hold up `close`."""
        with self._lock:
            self._live = [app for app in self._live if app["popen"].poll() is None or _closed_probe(app)]
            now = time.monotonic()
            due = [app for app in self._live if app["ended"] is None and now - app["probed"] >= PROBE_S]
            for app in due:
                app["probed"] = now
        for app in due:
            if task_ended(app["probe"]):
                app["ended"] = time.monotonic()
        with self._lock:
            now = time.monotonic()
            for app in self._live:
                if self._closed or app["ended"] is None or now - app["ended"] < EXIT_GRACE_S:
                    continue
                if now - app["ended"] >= EXIT_GRACE_S + KILL_GRACE_S:
                    app["popen"].kill()
                    continue
                if not app.get("terminated"):
                    LOG.warning("run %s is over (stopped with `flwr stop`, or finished) and its ServerApp process "
                                "(pid %s) did not exit: SIGTERM, SIGKILL in %.0f s", app["run_id"],
                                app["popen"].pid, KILL_GRACE_S)
                app["terminated"] = True
                app["popen"].terminate()

    def close(self) -> list[subprocess.Popen]:
        """No more starts; the processes still running."""
        with self._lock:
            self._closed = True
            for app in self._live:
                _closed_probe(app)
            return [app["popen"] for app in self._live if app["popen"].poll() is None]


def _closed_probe(app: dict) -> bool:
    """Close `app`'s probe client; False (so a filter drops it)."""
    try:
        app["probe"].close()
    except Exception:  # noqa: BLE001 - a client already closed
        pass
    return False


def _serve(*, address: str, ca: str, secret: bytes, operator_key: Path, state_dir: Path,
           stop: threading.Event, env: dict, apps: ServerApps) -> None:
    """Start one gated ServerApp process per acquired task, at most MAX_SERVERAPPS at once (anyone
    can submit runs: each refused one still costs a process start); the token never sits in argv."""
    import httpx
    from flwr.supercore.constant import TaskType

    root_certificates = Path(ca).read_bytes()
    client = acquiring_client(address=address, secret=secret, root_certificates=root_certificates)
    while not stop.is_set():
        apps.check()
        if len(apps) >= MAX_SERVERAPPS:
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
        token, task = acquired
        apps.start([sys.executable, "-m", "fedtune.serverapp_process", address, str(operator_key), str(state_dir), ca],
                   env=dict(env, **{TOKEN_ENV: token}), run_id=task.run_id,
                   probe=task_client(address=address, token=token, component="SuperExec",
                                     root_certificates=root_certificates, max_tries=1))


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
