"""A real Flower deployment on loopback for tests: a SuperLink with TLS and SuperNode
authentication, SuperNodes with their own node config and their own keys, and `flwr run` against it.

Each simulated institution N makes its key pair in its own folder (workdir/site-N/keys, with
`fedtune node-keys`' code); the coordinator is handed, and registers, only the .pub.

Every process runs in its own process group and is killed on exit; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.node_keys import make_node_keys
from tests.helpers import ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(flwr_home: Path) -> dict[str, str]:
    # SuperLink and SuperNode start flower-superexec, flwr-serverapp, flwr-clientapp by name. One torch
    # thread per process (unless set), as Ray gives a simulated client: three nodes training at once on
    # two cores with torch's default threads each fight over them (README, "Speed").
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(flwr_home),
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def app_checkout(dest: Path) -> Path:
    """This repository's app as `flwr run` bundles it, copied without the folders its .gitignore
    leaves out of the bundle anyway (.venv above all): the same FAB, hence the same hash, built in a
    fraction of a second where `flwr run` of the checkout itself walks the venv (seconds to tens of them)."""
    from fedtune.common.trust.app_pin import SKIPPED

    skipped = SKIPPED | {"fedtune.egg-info"}
    return Path(shutil.copytree(ROOT, dest, symlinks=True, ignore=lambda folder, names: [
        name for name in names if name in ("__pycache__", ".pytest_cache") or (Path(folder) == ROOT and name in skipped)]))


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
    """Start it with `make_node_key`, `start_superlink`, `register`, `start_supernode`; `close` kills everything."""

    workdir: Path
    credentials: Path  # `fedtune certs --out` directory: the CA and the SuperLink's certificate, no node keys
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)
    submitted: int = 0  # `flwr run`s of this repository's app

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

    def start_superlink(self, *, operator_key: Path | None = None) -> Process:
        """With `operator_key` (operator.pub), the coordinator's pinned runtime (`fedtune run-superlink`):
        only the installed ServerApp, for signed jobs. Without, plain flower-superlink: an operator
        who runs whatever is submitted."""
        c = self.credentials
        flower = ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "superlink" / "server.pem"),
                  "--ssl-keyfile", str(c / "superlink" / "server.key"), "--enable-supernode-auth",
                  "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)]
        if operator_key is None:
            command = [str(BIN / "flower-superlink"), *flower]
        else:
            command = [str(BIN / "fedtune"), "run-superlink", "--operator-key", str(operator_key),
                       "--state-dir", str(self.workdir / "coordinator" / "state"), *flower]
        link = self.spawn("superlink", command, home="superlink")
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

    def flwr_run_async(self, run_config: str, *, app: Path | None = None) -> subprocess.Popen:
        """`flwr run` of this repository's app (or `app`) against the SuperLink, streaming its log."""
        if app is None:
            self.submitted += 1
            app = app_checkout(self.workdir / "submitted" / f"app-{self.submitted}")
        popen = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "fedtune", "--stream",
                                  "--run-config", run_config], cwd=ROOT,
                                 env=environment(self.workdir / "homes" / "cli"), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.processes.append(Process(name="flwr-run", popen=popen, log=self.workdir / "logs" / "flwr-run.log"))
        return popen

    def node_key(self, index: int) -> Path:
        """Institution `index`'s private SuperNode key, in its own folder."""
        return self.workdir / f"site-{index}" / "keys" / "supernode"

    def make_node_key(self, index: int) -> Path:
        """Institution `index` makes its key pair itself; returns the .pub it sends the coordinator."""
        return make_node_keys(out=self.node_key(index).parent, name=f"site-{index}").supernode_public_key

    def register(self, *indices: int) -> None:
        """The coordinator receives each institution's .pub (nothing else) and registers it: one
        `flwr supernode register` per key, all at once (each is a process start, and they are independent)."""
        commands = []
        for index in indices:
            received = self.workdir / "coordinator" / "received" / f"site-{index}.pub"
            received.parent.mkdir(parents=True, exist_ok=True)
            received.write_bytes(self.node_key(index).with_name("supernode.pub").read_bytes())
            commands.append(subprocess.Popen(
                [str(BIN / "flwr"), "supernode", "register", str(received), "fedtune"], cwd=ROOT,
                env=environment(self.workdir / "homes" / "cli"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True))
        try:
            for index, popen in zip(indices, commands):
                out, _ = popen.communicate(timeout=120)
                assert popen.returncode == 0, f"site-{index}: {out}"
        finally:
            for popen in commands:
                if popen.poll() is None:
                    os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=30)

    def start_supernode(self, index: int, node_config: str, *, key_index: int | None = None,
                        root_certificates: Path | None = None, extra: tuple[str, ...] = (),
                        runtime: bool = False, timings: Path | None = None) -> Process:
        """`runtime`: the institution's `fedtune run-node` (its pinned runtime beside the SuperNode);
        otherwise plain flower-supernode, which runs whatever app a run ships."""
        key = self.node_key(index if key_index is None else key_index)
        common = ["--superlink", self.address, "--auth-supernode-private-key", str(key), "--node-config", node_config]
        if root_certificates is not None:
            common += ["--root-certificates", str(root_certificates)]
        if runtime:
            args = [str(BIN / "fedtune"), "run-node", *common, *extra,
                    *(["--timings", str(timings)] if timings is not None else [])]
        else:
            args = [str(BIN / "flower-supernode"), *common, "--host", "127.0.0.1", "--port", str(free_port()), *extra]
        return self.spawn(f"supernode-{index}", args, home=f"supernode-{index}")

    def close(self) -> None:
        for process in reversed(self.processes):
            process.kill()
