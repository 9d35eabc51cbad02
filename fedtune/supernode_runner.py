"""`fedtune run-node`'s supervision of `flower-supernode`: relay its output, add a hint to the
Flower errors someone else must fix, and never hang when Flower keeps its local API up after one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedtune.node_check import hint_for

GIVE_UP_AFTER_FATAL_S = 10


def run_supernode(args: list[str], *, give_up=lambda: False) -> tuple[int, list[str]]:
    """Run flower-supernode with `args` until it exits (or `give_up()` says to stop it); returns
    its exit code and the hints to print."""
    venv_bin = str(Path(sys.executable).parent)  # the SuperNode starts flwr-clientapp etc. by name
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    executable = shutil.which("flower-supernode", path=env["PATH"]) or "flower-supernode"
    process = subprocess.Popen([executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())  # stopping run-node stops the node
    hints: list[str] = []
    fatal_at: list[float] = []

    def relay() -> None:
        for line in process.stdout:
            sys.stdout.write(line)
            hint = hint_for(line)
            if hint and hint not in hints:
                hints.append(hint)
                fatal_at.append(time.monotonic())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        while process.poll() is None:
            if (fatal_at and time.monotonic() - fatal_at[0] > GIVE_UP_AFTER_FATAL_S) or give_up():
                process.terminate()
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        reader.join(timeout=5)
    return (code if code > 0 else (1 if hints else code)), hints


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

    from fedtune.node_runtime import NodeRuntime, configure_logging
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
            code, hints = run_supernode([*args, *extra, "--isolation", "process", "--superexec-auth-secret-file",
                                         str(secret)], give_up=lambda: not server.is_alive())  # ours last: they win
            if not server.is_alive() and not runtime.stop.is_set():
                hints.append("the node runtime stopped (its error is above); the SuperNode was stopped with it")
                code = code or 1
            return code, hints
        finally:
            runtime.stop.set()
            server.join(timeout=10)


def _checked_extra(extra: list[str]) -> list[str]:
    """The extra flower-supernode arguments, refused where they would override what run-node set,
    with the loopback host and a free port added when not given."""
    import socket

    from common.errors import FedtuneError
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
