"""A one-node Ray cluster started the way a user starts one (`ray start --head`), for the tests
that attach a simulation to it (tests/test_simulation.py's Ray run)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

RAY_CLI = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A one-node Ray cluster: `ray start --head --block` in a session of its own, so every process
    it starts is known by its process group (and its temp dir), and stopped by id, never by `ray
    stop`, which stops every Ray process on the machine (another test's simulation included)."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir  # short on purpose: Ray's Unix sockets live under it
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        # Ray 2.55 cannot be held to the loopback: --node-ip-address=127.0.0.1 is replaced by this
        # machine's address (ray/_private/services.py resolve_ip_for_localhost) and the GCS listens
        # on every interface. Its own temp dir keeps `ray_current_cluster` out of /tmp/ray, where a
        # plain ray.init() elsewhere would find it and attach.
        with (temp_dir / "ray-start.log").open("w") as log:
            self.head = subprocess.Popen(
                [str(RAY_CLI), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2", "--num-gpus=0",
                 "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                 f"--ray-client-server-port={_free_port()}"],
                stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
        try:
            self.address = self._wait_for_address(timeout=120)
        except BaseException:
            self.stop()
            raise

    def _wait_for_address(self, *, timeout: float) -> str:
        """The GCS address `ray start` writes once the node is up (what it tells a user to attach to)."""
        written = self.temp_dir / "ray_current_cluster"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.head.poll() is None:
            if written.is_file() and written.read_text().strip():
                return written.read_text().strip()
            time.sleep(0.5)
        raise AssertionError(f"ray start gave no address: {(self.temp_dir / 'ray-start.log').read_text()[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        """The cluster's live processes: `ray start`'s process group, or any naming its temp dir."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                named = str(self.temp_dir) in " ".join(proc.info["cmdline"] or ())
                mine = named or os.getpgid(proc.pid) == self.head.pid
                if mine and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.Error, ProcessLookupError):
                continue
        return found

    def actor_logs(self, actor: str) -> list[Path]:
        """The stdout logs of the cluster's workers that hosted an `actor`."""
        return [log for log in self.temp_dir.glob("session_latest/logs/worker-*.out")
                if f":actor_name:{actor}" in log.read_text(errors="replace")]

    def names(self) -> set[str]:
        return {proc.name() for proc in self.processes()}

    def stop(self) -> None:
        """SIGTERM to each of the cluster's processes, by id; SIGKILL to any left after 10 s."""
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            procs = self.processes()
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=grace)
        self.head.wait(timeout=10)


@contextmanager
def ray_cluster() -> Iterator[Cluster]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cluster = None
    try:
        cluster = Cluster(temp_dir)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
