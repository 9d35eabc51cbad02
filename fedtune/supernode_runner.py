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


RUNNER_OWNED = ("--isolation", "--superexec-auth-secret-file")
LOOPBACK = ("127.0.0.1", "localhost")


def run_supernode_with_runtime(args: list[str], *, extra: list[str], gate, timings: Path | None
                               ) -> tuple[int, list[str]]:
    """flower-supernode in process isolation, its runtime API on loopback behind a fresh shared
    secret, and this process as its only executor (fedtune/node_runtime.py)."""
    import socket
    import tempfile

    from common.errors import FedtuneError
    from fedtune.node_runtime import NodeRuntime, configure_logging
    from fedtune.runtime_api import flag_value, write_secret

    owned = [arg for arg in extra if arg.split("=")[0] in RUNNER_OWNED]
    if owned:
        raise FedtuneError(f"run-node sets {', '.join(RUNNER_OWNED)} itself (its runtime is the node's only "
                           f"executor, on loopback); leave out {owned[0].split('=')[0]}")
    flags = [arg.split("=")[0] for arg in extra]
    if "--host" in flags and flag_value(extra, "--host") not in LOOPBACK:
        raise FedtuneError("run-node keeps the SuperNode's runtime API on loopback: --host must be 127.0.0.1")
    if "--host" not in flags:
        extra = [*extra, "--host", "127.0.0.1"]
    if "--port" not in flags:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            extra = [*extra, "--port", str(probe.getsockname()[1])]
    port = flag_value(extra, "--port")
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="fedtune-node-") as scratch:
        secret = write_secret(Path(scratch) / "runtime.secret")
        runtime = NodeRuntime(address=f"127.0.0.1:{port}", secret=secret.read_bytes(), gate=gate,
                              timings_file=timings)
        server = threading.Thread(target=runtime.serve, name="fedtune-node-runtime", daemon=True)
        server.start()
        try:  # a SuperNode whose runtime died would take messages no one answers: stop it too
            code, hints = run_supernode([*args, "--isolation", "process", "--superexec-auth-secret-file",
                                         str(secret), *extra], give_up=lambda: not server.is_alive())
            if not server.is_alive() and not runtime.stop.is_set():
                hints.append("the node runtime stopped (its error is above); the SuperNode was stopped with it")
                code = code or 1
            return code, hints
        finally:
            runtime.stop.set()
            server.join(timeout=10)
