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


def run_supernode(args: list[str]) -> tuple[int, list[str]]:
    """Run flower-supernode with `args`; returns its exit code and the hints to print."""
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
            if fatal_at and time.monotonic() - fatal_at[0] > GIVE_UP_AFTER_FATAL_S:
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
