"""A client restarted in a new process continues its epsilon from its ledger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedtune.client.fl_client import FedtuneClient
from fedtune.common.config import RunConfig
from fedtune.common.ledger.chain import LedgerError, read_records
from fedtune.common.privacy.accounting import epsilon_of
from tests.conftest import initial_adapter
from tests.helpers import ROOT

RUN_ID = "run-7"
ONE_ROUND = textwrap.dedent(f"""
    import json, sys, time
    import numpy as np
    from fedtune.client.fl_client import FedtuneClient
    from fedtune.common.config import RunConfig
    config_path, arrays_path, ledger_dir, server_round, mode = sys.argv[1:6]
    if mode == "wait":
        sys.stdin.readline()  # imports done; the ledger is read only once the test says go
    config = RunConfig.load(path=config_path)
    arrays = list(np.load(arrays_path).values())
    client = FedtuneClient(config=config, partition_id=0, ledger_dir=ledger_dir, run_id={RUN_ID!r})
    update, n, metrics = client.fit(arrays, {{"server-round": int(server_round)}})
    print(json.dumps(metrics), flush=True)
    if mode == "linger":
        time.sleep(600)  # stay alive until the test kills this process
""")


def _start(tmp_path, server_round: int, *, mode: str = "run") -> subprocess.Popen:
    """A new Python process that trains one round of partition 0 (`mode`: run, linger after the
    reply until killed, or wait for a line on stdin before reading the ledger)."""
    args = [sys.executable, "-c", ONE_ROUND, str(tmp_path / "config.toml"), str(tmp_path / "adapter.npz"),
            str(tmp_path / "ledger"), str(server_round), mode]
    return subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _metrics(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _fit_here(folder, server_round: int) -> dict:
    """One round of partition 0 in this process, from the same files a new process reads."""
    config = RunConfig.load(path=folder / "config.toml")
    client = FedtuneClient(config=config, partition_id=0, ledger_dir=folder / "ledger", run_id=RUN_ID)
    return client.fit(list(np.load(folder / "adapter.npz").values()), {"server-round": server_round})[2]


@pytest.fixture()
def client_files(tiny_config, tmp_path):
    config = tiny_config(num_rounds=3, target_epsilon=6.0)
    (tmp_path / "config.toml").write_text(config.to_toml())
    np.savez(tmp_path / "adapter.npz", *initial_adapter(config))
    return tmp_path


@pytest.mark.slow
def test_restarted_client_continues_epsilon_and_never_double_counts(client_files):
    """Round 1 here, round 2 in a process killed without warning right after its reply, round 3 in
    another new process (started early so its imports overlap round 2; it reads the ledger after
    the kill)."""
    reported = [_fit_here(client_files, 1)["epsilon"]]
    lingering = _start(client_files, 2, mode="linger")
    restarted = _start(client_files, 3, mode="wait")
    try:
        line = lingering.stdout.readline()
        lingering.send_signal(signal.SIGKILL)
        lingering.wait(timeout=30)
        assert lingering.returncode == -signal.SIGKILL, lingering.stderr.read()[-3000:]
        reported.append(json.loads(line)["epsilon"])
        restarted.stdin.write("go\n")
        restarted.stdin.flush()
        reported.append(_metrics(restarted)["epsilon"])
    finally:
        for process in (lingering, restarted):
            if process.poll() is None:
                process.kill()
                process.wait()

    records = read_records(client_files / "ledger" / "ledger.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    sigma, rate, steps = records[0]["noise_multiplier"], records[0]["sample_rate"], records[0]["steps"]
    assert all(r["noise_multiplier"] == sigma for r in records)  # calibrated once, never again
    expected = [epsilon_of([(sigma, rate, k * steps)], delta=1e-5) for k in (1, 2, 3)]
    assert reported == pytest.approx(expected, rel=1e-12)
    assert reported[0] < reported[1] < reported[2] <= 6.0


def test_a_tampered_ledger_stops_the_client_before_training(client_files):
    """In this process: what stops the client is its ledger's signature check, not the process."""
    _fit_here(client_files, 1)
    sent = client_files / "ledger" / "sent-updates"
    assert [p.name.split("-", 1)[1] for p in sent.iterdir()] == ["round-1.npz"]
    path = client_files / "ledger" / "ledger.jsonl"
    record = json.loads(path.read_text())
    record["epsilon"] = 0.01
    path.write_text(json.dumps(record) + "\n")
    before = path.read_text()
    with pytest.raises(LedgerError) as refused:
        _fit_here(client_files, 2)
    assert "failed verification: ledger record 1 (round 1): signature does not verify" in str(refused.value)
    assert "refusing to train" in str(refused.value)
    assert path.read_text() == before  # nothing appended, nothing trained
    assert [p.name.split("-", 1)[1] for p in sent.iterdir()] == ["round-1.npz"]  # no round-2 update was made
