"""A real Flower deployment on loopback for tests: a SuperLink with TLS and SuperNode
authentication, SuperNodes with their own node config, and `flwr run` against it.

Every process runs in its own process group and is killed on exit; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(flwr_home: Path) -> dict[str, str]:
    # SuperLink and SuperNode start flower-superexec, flwr-serverapp, flwr-clientapp by name.
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(flwr_home),
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def wait_for(predicate, *, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=30)


@dataclass
class LoopbackFederation:
    """Start it with `start_superlink`, `register`, `start_supernode`; `close` kills everything."""

    workdir: Path
    credentials: Path  # `fedtune certs --out` directory
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self, name: str, args: list[str], *, home: str) -> Process:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("wb")
        popen = subprocess.Popen(args, cwd=self.workdir, env=environment(self.workdir / "homes" / home),
                                 stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(name=name, popen=popen, log=log)
        self.processes.append(process)
        return process

    def start_superlink(self) -> Process:
        c = self.credentials
        link = self.spawn("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"),
            "--ssl-certfile", str(c / "superlink" / "server.pem"), "--ssl-keyfile", str(c / "superlink" / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port)], home="superlink")
        wait_for(lambda: "Uvicorn running on https" in link.text() or link.popen.poll() is not None,
                 timeout=120, what="the SuperLink")
        assert link.popen.poll() is None, link.text()[-3000:]
        self._write_cli_config()
        return link

    def _write_cli_config(self) -> None:
        home = self.workdir / "homes" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedtune"\n\n[superlink.fedtune]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.credentials / "ca.crt"}"\n')

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=environment(self.workdir / "homes" / "cli"),
                              capture_output=True, text=True, timeout=timeout)

    def flwr_run_async(self, run_config: str) -> subprocess.Popen:
        """`flwr run` of this repository's app against the SuperLink, streaming its log."""
        popen = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "fedtune", "--stream",
                                  "--run-config", run_config], cwd=ROOT,
                                 env=environment(self.workdir / "homes" / "cli"), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.processes.append(Process(name="flwr-run", popen=popen, log=self.workdir / "logs" / "flwr-run.log"))
        return popen

    def register(self, index: int) -> None:
        result = self.flwr("supernode", "register", str(self.credentials / "supernodes" / f"supernode-{index}.pub"),
                           "fedtune")
        assert result.returncode == 0, result.stdout + result.stderr

    def start_supernode(self, index: int, node_config: str, *, key_index: int | None = None,
                        root_certificates: Path | None = None, extra: tuple[str, ...] = ()) -> Process:
        key = self.credentials / "supernodes" / f"supernode-{index if key_index is None else key_index}"
        args = [str(BIN / "flower-supernode"), "--superlink", self.address,
                "--auth-supernode-private-key", str(key), "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", node_config, *extra]
        if root_certificates is not None:
            args += ["--root-certificates", str(root_certificates)]
        return self.spawn(f"supernode-{index}", args, home=f"supernode-{index}")

    def close(self) -> None:
        for process in reversed(self.processes):
            process.kill()
