"""`fedtune run-node`'s supervision of `flower-supernode`: relay its output, add a hint to the
Flower errors someone else must fix, never hang when Flower keeps its local API up after one, and
come back by itself when the node's registration does.

Flower 1.41's Control API has no authentication: anyone who reaches the SuperLink's port can
unregister a node (`flwr supernode unregister`). The SuperNode then gets 401s and stops itself,
and a restart fails to activate; Flower never registers an unregistered key again, so the node
comes back with a new key pair at the same path, once the coordinator registered it. run-node does not
exit on either once its node has served: it says so in one line (what the operator must do) and
starts the SuperNode again with a backoff, beside the same runtime, until the key is registered and
the node serves again. A key never registered since run-node started is a setup error: it exits
with the hint, as before."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.node_check import hint_for

GIVE_UP_AFTER_FATAL_S = 10
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 60.0  # backoff while this node's key is not registered at the SuperLink
# Flower's lines when the SuperLink does not (or no longer) know this node's key: a restart that
# fails to activate, or the SuperNode stopping itself after a 401 (it SIGINTs itself).
NOT_REGISTERED = ("Failed to activate SuperNode",)
STOPPED_ITSELF = "SuperNode terminated gracefully."
ACTIVATED = "SuperNode ID:"
NOT_REGISTERED_LINE = ("this node's key is not registered at the SuperLink {superlink}: it was unregistered (by the "
                       "coordinator, or by anyone who reaches its unauthenticated Control API), and Flower 1.41 never "
                       "registers an unregistered key again. Fix: move {key} and its .pub aside, put a new pair at "
                       "that path (`fedtune node-keys --out {key_dir}` makes one) and have the coordinator register "
                       "the new .pub (`flwr supernode register`); run-node retries in {wait:.0f} s (and keeps "
                       "retrying, up to every {most:.0f} s) and serves again with it")


@dataclass
class SupernodeExit:
    code: int
    hints: list[str]
    unregistered: bool = False  # the SuperLink does not (or no longer) know this node's key
    activated: bool = False  # the SuperLink accepted the node (it got its node id) before that
    stopped: bool = False  # run-node stopped it (a signal, or its runtime died)


def run_supernode(args: list[str], *, give_up=lambda: False) -> tuple[int, list[str]]:
    """Run flower-supernode with `args` until it exits (or `give_up()` says to stop it); returns
    its exit code and the hints to print."""
    ended = supervise_supernode(args, give_up=give_up)
    return ended.code, ended.hints


def supervise_supernode(args: list[str], *, give_up=lambda: False) -> SupernodeExit:
    """One flower-supernode process with `args`, until it exits (or `give_up()` says to stop it)."""
    venv_bin = str(Path(sys.executable).parent)  # the SuperNode starts flwr-clientapp etc. by name
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    executable = shutil.which("flower-supernode", path=env["PATH"]) or "flower-supernode"
    process = subprocess.Popen([executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    stopped: list[bool] = []

    def stop(*_) -> None:
        stopped.append(True)
        process.terminate()

    signal.signal(signal.SIGTERM, stop)  # stopping run-node stops the node
    hints: list[str] = []
    fatal_at: list[float] = []
    unregistered: list[bool] = []
    activated: list[bool] = []

    def relay() -> None:
        for line in process.stdout:
            sys.stdout.write(line)
            if ACTIVATED in line:
                activated.append(True)
            if any(mark in line for mark in NOT_REGISTERED) or (STOPPED_ITSELF in line and not stopped):
                unregistered.append(True)
                fatal_at.append(time.monotonic())
            hint = hint_for(line)
            if hint and hint not in hints:
                hints.append(hint)
                fatal_at.append(time.monotonic())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        while process.poll() is None:
            if fatal_at and time.monotonic() - fatal_at[0] > GIVE_UP_AFTER_FATAL_S:
                process.terminate()
            elif give_up():
                stop()
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            stopped.append(True)
            process.terminate()
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        reader.join(timeout=5)
    other_hints = [hint for hint in hints if hint != hint_for(NOT_REGISTERED[0])]
    return SupernodeExit(code=code if code > 0 else (1 if hints else code), hints=hints,
                         unregistered=bool(unregistered) and not other_hints and not stopped,
                         activated=bool(activated), stopped=bool(stopped))


# What run-node decides (and check-node checked): Flower's argparse takes any prefix of a flag, and
# the last of two, so an extra argument may not even abbreviate one of these.
GUARDED = ("--isolation", "--superexec-auth-secret-file", "--node-config", "--superlink", "--root-certificates",
           "--auth-supernode-private-key", "--host")
LOOPBACK = ("127.0.0.1", "localhost")


def run_supernode_with_runtime(args: list[str], *, extra: list[str], gate, node_config: dict,
                               timings: Path | None) -> tuple[int, list[str]]:
    """flower-supernode in process isolation, its runtime API on loopback behind a fresh shared
    secret, and this process as its only executor (fedtune/node_runtime.py)."""
    import tempfile

    from fedtune.node_runtime import LOG, NodeRuntime, configure_logging
    from fedtune.runtime_api import flag_value, write_secret

    extra = _checked_extra(extra)
    port = flag_value(extra, "--port")
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="fedtune-node-") as scratch:
        secret = write_secret(Path(scratch) / "runtime.secret")
        runtime = NodeRuntime(address=f"127.0.0.1:{port}", secret=secret.read_bytes(), gate=gate,
                              node_config=node_config, timings_file=timings)
        server = threading.Thread(target=runtime.serve, name="fedtune-node-runtime", daemon=True)
        server.start()
        try:  # a SuperNode whose runtime died would take messages no one answers: stop it too
            wait, served = RETRY_FIRST_S, False
            while True:
                started = time.monotonic()
                ended = supervise_supernode([*args, *extra, "--isolation", "process", "--superexec-auth-secret-file",
                                             str(secret)], give_up=lambda: not server.is_alive())  # ours last: win
                served = served or ended.activated
                # A key never registered since run-node started is a setup error (exit with the hint); a
                # registration that went away is waited for.
                if not (ended.unregistered and served) or not server.is_alive():
                    break
                if time.monotonic() - started > RETRY_MAX_S:  # it had served: start the backoff afresh
                    wait = RETRY_FIRST_S
                key = Path(str(flag_value(args, "--auth-supernode-private-key")))
                LOG.warning(NOT_REGISTERED_LINE.format(superlink=flag_value(args, "--superlink"), key=key,
                                                       key_dir=key.parent, wait=wait, most=RETRY_MAX_S))
                if _interrupted_sleep(wait):
                    break
                wait = min(wait * 2, RETRY_MAX_S)
            code, hints = ended.code, ended.hints
            if not server.is_alive() and not runtime.stop.is_set():
                hints.append("the node runtime stopped (its error is above); the SuperNode was stopped with it")
                code = code or 1
            return code, hints
        finally:
            runtime.stop.set()
            server.join(timeout=10)


def _interrupted_sleep(seconds: float) -> bool:
    """Sleep `seconds`; True when SIGTERM came meanwhile (run-node then stops instead of retrying)."""
    stopping: list[bool] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        deadline = time.monotonic() + seconds
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return bool(stopping)


def _checked_extra(extra: list[str]) -> list[str]:
    """The extra flower-supernode arguments, refused where they would override what run-node set,
    with the loopback host and a free port added when not given."""
    import socket

    from fedtune.common.errors import FedtuneError
    from fedtune.runtime_api import abbreviated, flag_value

    names = [arg.split("=")[0] for arg in extra if arg.startswith("--")]
    loopback_host = "--host" in names and flag_value(extra, "--host") in LOOPBACK
    hit = abbreviated([arg for arg in extra if not (loopback_host and arg.split("=")[0] == "--host")], GUARDED)
    if hit:
        raise FedtuneError(f"run-node sets {hit[1]} itself (the node runs only its checked config, its runtime "
                           f"on loopback is the only executor); leave out {hit[0]}")
    if "--host" not in names:
        extra = [*extra, "--host", "127.0.0.1"]
    if "--port" not in names:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            extra = [*extra, "--port", str(probe.getsockname()[1])]
    return extra
