"""Issue 34's small defects: piped output keeps long lines whole, the in-round status line fits 80
columns, run-node's runtime logs each line once and stops without retrying, a misspelt node-config
key is reported once, and an unknown option that names a config key suggests --set."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from tests.conftest import make_texts, write_csv
from tests.helpers import ROOT, fedtune, run_fedtune


def test_piped_output_keeps_a_long_line_whole(tmp_path):
    """`fedtune node-keys ... | grep` finds its line: nothing wraps it at the console width."""
    out = tmp_path / ("a-folder-name-long-enough-that-the-line-passes-one-hundred-and-twenty-columns" * 2)
    result = run_fedtune("node-keys", "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    line = (f"send to the coordinator  {out / 'supernode.pub'}   "
            f"(it runs `flwr supernode register supernode.pub <federation>`)")
    assert len(line) > 200 and line in result.stdout.splitlines(), result.stdout


def test_piped_stderr_keeps_a_long_line_whole():
    code = "from fedtune import shell; shell.err.print('word ' * 60 + 'end', highlight=False)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stderr.splitlines() == ["word " * 60 + "end"], result.stderr


def _rendered_status(line: str) -> str:
    """The status line as `fedtune simulate` shows it: rich's spinner, then the text."""
    from rich.console import Console
    from rich.spinner import Spinner

    screen = io.StringIO()
    Console(file=screen, width=200, color_system=None).print(Spinner("dots", text=line))
    return screen.getvalue().rstrip("\n")


def test_causal_lm_status_line_fits_80_columns(tmp_path):
    from fedtune.common.config import RunConfig
    from fedtune.simulations.progress import describe

    clients = RunConfig.load(path=ROOT / "configs" / "causal-lm.toml").clients_per_round  # 3 institutions
    now = time.time()
    for index, (step, steps) in enumerate([(7, 12), (5, 12), (3, 11)][:clients]):
        (tmp_path / f"client-{index}.json").write_text(json.dumps({"step": step, "steps": steps, "time": now}))
    shown = _rendered_status(describe(tmp_path, round_number=3, since=now - 1, clients=clients, now=now + 311))
    assert len(shown) <= 80, shown
    assert all(f"client-{index}" in shown for index in range(clients)) and shown.endswith(", 312 s"), shown
    # Many clients with long runs: the line still fits, the clients it leaves out counted.
    for index in range(8):
        (tmp_path / f"hospital-{index}.json").write_text(json.dumps({"step": 123, "steps": 1500, "time": now}))
    crowded = _rendered_status(describe(tmp_path, round_number=12, since=now - 1, clients=11, now=now + 4000))
    assert len(crowded) <= 80 and " more, 4001 s" in crowded and "round 12: 0/11 trained" in crowded, crowded


def test_node_runtime_logs_each_line_once():
    """Opacus' import puts a handler on the root logger; Flower's lines and the runtime's own still print once."""
    code = ("import logging, opacus; from fedtune.node_runtime import configure_logging; configure_logging(); "
            "from flwr.common.logger import log; log(logging.WARNING, 'flower-marker'); "
            "logging.getLogger('fedtune.node').warning('runtime-marker')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("flower-marker") == 1 and result.stderr.count("runtime-marker") == 1, result.stderr


def test_node_runtime_stops_at_once_when_its_supernode_is_gone():
    """run-node's Ctrl-C/SIGTERM sets `stop` with the SuperNode gone: the runtime returns within a
    second instead of retrying AcquireTask (a 'retrying' line each time) until run-node gives up on it."""
    import fedtune.client.app as client_app  # noqa: F401  (serve imports it: loaded here, so the timing is the runtime's own)
    from fedtune.node_runtime import NodeRuntime

    with socket.socket() as probe:  # a port nothing listens on: the SuperNode that went away
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    flwr_log = logging.getLogger("flwr")
    flwr_log.addHandler(handler)
    runtime = NodeRuntime(address=f"127.0.0.1:{port}", secret=b"s" * 32,
                          gate=SimpleNamespace(app=SimpleNamespace(sha256="0" * 64)), node_config={})
    server = threading.Thread(target=runtime.serve, daemon=True)
    try:
        server.start()
        time.sleep(1.5)  # several refused connections
        runtime.stop.set()
        stopped_at = time.monotonic()
        server.join(timeout=5)
        assert not server.is_alive() and time.monotonic() - stopped_at < 1.5
        assert not [line for line in lines if "retrying" in line], lines
    finally:
        runtime.stop.set()
        flwr_log.removeHandler(handler)


def test_check_node_reports_a_misspelt_key_once(tmp_path):
    data = write_csv(tmp_path / "records.csv", make_texts(3))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        superlink = f"127.0.0.1:{probe.getsockname()[1]}"
    node_config = (f"data='{data}' client-id='hospital-a' ledger-dir='{tmp_path / 'ledger'}' "
                   f"roster='{tmp_path / 'roster.json'}' target_epsilon=1")
    result = fedtune("check-node", "--superlink", superlink, "--root-certificates", str(tmp_path / "ca.crt"),
                     "--auth-supernode-private-key", str(tmp_path / "supernode"), "--node-config", node_config)
    assert result.returncode == 3
    typo = [line for line in (result.stdout + result.stderr).splitlines() if "target_epsilon" in line]
    assert typo == ["error: node config: unknown node config key 'target_epsilon'. Did you mean "
                    "'target-epsilon'?"], result.stdout + result.stderr


def test_an_unknown_option_that_names_a_config_key_suggests_set():
    result = fedtune("simulate", "--rounds", "3")
    assert result.returncode == 4
    assert ("No such option '--rounds'. Config keys go through --set: did you mean '--set num-rounds=VALUE'?"
            in result.stderr and "--out" not in result.stderr), result.stderr
    near_an_option = fedtune("simulate", "--jsn")  # still click's own suggestion
    assert near_an_option.returncode == 4 and "'--json'" in near_an_option.stderr, near_an_option.stderr
    assert "Config keys go through --set" not in near_an_option.stderr
