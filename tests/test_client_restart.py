"""A client restarted in a new process continues its epsilon from its ledger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from common.ledger.chain import read_records
from common.privacy.accounting import epsilon_of
from tests.conftest import initial_adapter
from tests.helpers import ROOT

ONE_ROUND = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from client.fl_client import FedtuneClient
    from common.config import RunConfig
    config_path, arrays_path, ledger_dir, server_round = sys.argv[1:5]
    config = RunConfig.load(path=config_path)
    arrays = list(np.load(arrays_path).values())
    client = FedtuneClient(config=config, partition_id=0, ledger_dir=ledger_dir, run_id="run-7")
    update, n, metrics = client.fit(arrays, {"server-round": int(server_round)})
    print(json.dumps(metrics), flush=True)
    if len(sys.argv) > 5:
        time.sleep(600)  # stay alive until the test kills this process
""")


def _start(tmp_path, server_round: int, *, linger: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-c", ONE_ROUND, str(tmp_path / "config.toml"), str(tmp_path / "adapter.npz"),
            str(tmp_path / "ledger"), str(server_round)] + (["linger"] if linger else [])
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture()
def client_files(tiny_config, tmp_path):
    config = tiny_config(num_rounds=3, target_epsilon=6.0)
    (tmp_path / "config.toml").write_text(config.to_toml())
    np.savez(tmp_path / "adapter.npz", *initial_adapter(config))
    return tmp_path


def test_restarted_client_continues_epsilon_and_never_double_counts(client_files):
    reported = [_metrics(_start(client_files, 1))["epsilon"]]
    # round 2 in a process that is then killed without warning
    lingering = _start(client_files, 2, linger=True)
    line = lingering.stdout.readline()
    lingering.send_signal(signal.SIGKILL)
    lingering.wait(timeout=30)
    reported.append(json.loads(line)["epsilon"])
    reported.append(_metrics(_start(client_files, 3))["epsilon"])  # a new process again

    records = read_records(client_files / "ledger" / "ledger.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    sigma, rate, steps = records[0]["noise_multiplier"], records[0]["sample_rate"], records[0]["steps"]
    assert all(r["noise_multiplier"] == sigma for r in records)  # calibrated once, never again
    expected = [epsilon_of([(sigma, rate, k * steps)], delta=1e-5) for k in (1, 2, 3)]
    assert reported == pytest.approx(expected, rel=1e-12)
    assert reported[0] < reported[1] < reported[2] <= 6.0


def test_a_tampered_ledger_stops_the_client_before_training(client_files):
    _metrics(_start(client_files, 1))
    path = client_files / "ledger" / "ledger.jsonl"
    record = json.loads(path.read_text())
    record["epsilon"] = 0.01
    path.write_text(json.dumps(record) + "\n")
    before = path.read_text()
    process = _start(client_files, 2)
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "failed verification: ledger record 1 (round 1): signature does not verify" in err
    assert "refusing to train" in err
    assert path.read_text() == before  # nothing appended, nothing trained
