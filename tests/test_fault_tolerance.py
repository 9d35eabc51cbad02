"""Fault drills on real simulations: dropouts in every SecAgg+ stage, bad updates, a straggler,
and a coordinator killed after a checkpoint or in the middle of a round, then resumed.

The federations run on the in-process engine (the same ServerApp, ClientApp and drills, no Ray: the
engine is not the subject here); only the SIGKILL test needs a real process, and gets one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.client.fl_client import FedtuneClient
from fedtune.common.ledger.chain import read_records
from fedtune.common.ledger.records import is_round_record
from fedtune.common.privacy.plan import privacy_schedule
from fedtune.common.run_data import federated_splits
from fedtune.server.checkpoint import Checkpoint
from fedtune.server.drills import CoordinatorKilled
from fedtune.server.secure_aggregation import secagg_parameters
from fedtune.simulations import inprocess
from tests.conftest import initial_adapter
from tests.helpers import ROOT, fedtune, progress_table, read_metrics, saved_adapter_arrays, set_args

pytestmark = pytest.mark.slow


def _args(config, **keys) -> list[str]:
    base = dict(model=config.model, data=config.data, num_clients=config.num_clients,
                clients_per_round=config.clients_per_round, batch_size=config.batch_size,
                max_length=config.max_length, learning_rate=config.learning_rate,
                head_learning_rate=config.head_learning_rate, lora_variant=config.lora_variant, lora_rank=config.lora_rank,
                target_epsilon=config.target_epsilon, num_rounds=config.num_rounds, dp=config.dp,
                secure_aggregation=config.secure_aggregation, training_mode=config.training_mode)
    base.update(keys)
    return set_args(**base)


def _simulate(out: Path, config, **keys) -> subprocess.CompletedProcess:
    """`fedtune simulate` on the in-process engine, in this process."""
    return fedtune("simulate", "--engine", "in-process", "--out", str(out), *_args(config, **keys))


def _ledger(run: Path, owner: str) -> list[dict]:
    """The round records (a finished run's server ledger ends with its saved-adapter record)."""
    return [r for r in read_records(run / "ledgers" / owner / "ledger.jsonl") if is_round_record(r)]


def _planned_epsilon(config, partition: int, rounds_trained: int) -> float:
    """Epsilon after `rounds_trained` rounds, from the plan alone (what `fedtune plan` prints)."""
    n = len(federated_splits(config).clients[partition].train)
    schedule = privacy_schedule(dataset_size=n, batch_size=config.batch_size, local_epochs=config.local_epochs,
                                rounds=config.num_rounds, target_epsilon=config.target_epsilon,
                                delta=config.target_delta)
    return schedule["rounds"][rounds_trained - 1]["epsilon"]


def _audit_clean(run: Path) -> dict:
    audit = fedtune("audit", str(run), "--json")
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    return json.loads(audit.stdout)


DROPOUTS = ("1:drop-setup:0; 2:drop-share-keys:1; 3:drop-collect-masked-vectors:2; "
            "4:drop-collect-masked-vectors:0,1,2; 5:drop-unmask:3; 6:drop-share-keys:4; "
            "6:drop-collect-masked-vectors:0")


def test_secagg_survives_one_dropout_at_every_stage_and_fails_cleanly_below_threshold(tiny_config, tmp_path):
    """5 clients, threshold 3: one client vanishes at each stage in turn (rounds 1-3 and 5), three
    vanish after training in round 4, and two at different stages of round 6. Spent is spent:
    a client that vanished after training still counts that round."""
    config = tiny_config(num_clients=5, clients_per_round=5, num_rounds=6, dp=True, secure_aggregation=True,
                         inject_faults=DROPOUTS)
    # The real round loop, ClientApps and drills in one process, with `fedtune simulate`'s table.
    grid, run_dir = inprocess.federation(config, tmp_path / "run")
    table, shown = progress_table(config)
    inprocess.run(grid, config, run_dir, on_round=table.add)
    out = run_dir.path
    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    everyone = {f"client-{i}" for i in range(5)}
    answered = {1: everyone - {"client-0"}, 2: everyone - {"client-1"}, 3: everyone - {"client-2"},
                4: {"client-3", "client-4"}, 5: everyone,  # a node vanishing in unmask already sent its vector
                6: {"client-1", "client-2", "client-3"}}
    for m in metrics:
        assert set(m["clients"]) == answered[m["round"]], m["round"]
        assert m["failures"] == 5 - len(answered[m["round"]])
        assert m["update_applied"] is (m["round"] != 4), m
    assert "halted" in metrics[3]["aggregation_failed"]
    assert metrics[4]["clients_trained"] == 5

    server = _ledger(out, "server")
    assert [r["round"] for r in server] == [1, 2, 3, 4, 5, 6]
    sha = [r["adapter_sha256"] for r in server]
    assert sha[3] == sha[2] and len({sha[0], sha[1], sha[2], sha[4], sha[5]}) == 5  # round 4 applied nothing
    assert server[3]["aggregation_failed"] and not server[3]["update_applied"]

    # Each client signed every round it trained, whether or not its reply arrived.
    trained_rounds = {0: [2, 3, 4, 5, 6], 1: [1, 3, 4, 5, 6], 2: [1, 2, 3, 4, 5, 6], 3: [1, 2, 3, 4, 5, 6],
                      4: [1, 2, 3, 4, 5]}
    for partition, rounds in trained_rounds.items():
        records = _ledger(out, f"client-{partition}")
        assert [r["round"] for r in records] == rounds and all(r["status"] == "trained" for r in records)
        assert records[-1]["epsilon"] == pytest.approx(_planned_epsilon(config, partition, len(rounds)), rel=1e-9)
    audit = _audit_clean(out)
    assert any("client-2 signed a record for round 3" in note for note in audit["notes"])
    assert "did not answer" in shown.getvalue() and "global adapter unchanged" in shown.getvalue()


STRAGGLER_TIMEOUT = 60  # honest tiny-model clients answer in a second or two, even on a loaded machine


@pytest.fixture()
def stalls_on_the_engines_clock(monkeypatch) -> list[float]:
    """The `stall` drill's sleep moves the in-process engine's clock instead of the wall clock: the
    engine drops a reply later than the round timeout however long that timeout is, without a wait
    (the nodes run one after another here, so a real stall would be a real wait). The stalls asked
    for, in seconds."""
    import fedtune.client.drills as client_drills
    import fedtune.simulations.inprocess as simulations_inprocess

    stalled: list[float] = []
    clock = SimpleNamespace(monotonic=lambda: time.monotonic() + sum(stalled), sleep=stalled.append)
    monkeypatch.setattr(client_drills, "time", clock)
    monkeypatch.setattr(simulations_inprocess, "time", clock)
    return stalled


def test_bad_updates_and_a_straggler_are_left_out_and_the_rest_averaged(tiny_config, tmp_path,
                                                                        stalls_on_the_engines_clock):
    """Plain FedAvg, 6 clients: NaN, wrong shape, 1000x and a straggler past the round timeout.
    The new adapter is exactly the initial one plus the mean of the two honest updates."""
    config = tiny_config(num_clients=6, clients_per_round=6, num_rounds=1, dp=False, secure_aggregation=False,
                         round_timeout=float(STRAGGLER_TIMEOUT))
    out = tmp_path / "run"
    started = time.monotonic()
    result = _simulate(out, config, round_timeout=STRAGGLER_TIMEOUT,
                       inject_faults="1:nan:0; 1:wrong-shape:1; 1:scale-1000:2; 1:stall:3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [record] = read_metrics(out)
    assert record["update_applied"] and record["failures"] == 1 and "client-3" not in record["clients"]
    assert stalls_on_the_engines_clock == [2 * STRAGGLER_TIMEOUT]  # one straggler, 2x the timeout late
    assert record["seconds"] < STRAGGLER_TIMEOUT  # the round ended without it
    rejected = {cid: c.get("rejected") for cid, c in record["clients"].items() if c.get("rejected")}
    assert rejected["client-0"] == "contains NaN or Inf"
    assert rejected["client-1"].startswith("has tensor 0 of shape")
    assert rejected["client-2"].startswith("has L2 norm") and set(rejected) == {"client-0", "client-1", "client-2"}
    [server] = _ledger(out, "server")
    assert server["rejected"] == rejected

    initial = initial_adapter(config)
    honest = []
    for partition in (4, 5):  # the same deterministic local training, in this process
        client = FedtuneClient(config=config, partition_id=partition, ledger_dir=tmp_path / f"c{partition}",
                               run_id="check")
        update, n, _ = client.fit([a.copy() for a in initial], {"server-round": 1})
        honest.append((update, n))
    total = sum(n for _, n in honest)
    expected = [g + sum(n / total * u[i] for u, n in honest) for i, g in enumerate(initial)]
    saved = saved_adapter_arrays(out, num_labels=3)
    assert len(saved) == len(expected)
    for got, want, start in zip(saved, expected, initial):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert any(not np.allclose(got, start) for got, start in zip(saved, initial))
    assert time.monotonic() - started < 300


def test_secagg_skips_a_round_whose_sum_is_broken_and_clips_a_huge_update(tiny_config, tmp_path, caplog):
    """Under SecAgg+ the server sees only the sum. A node whose update holds NaN refuses to mask
    it (quantized, it would shift the sum unseen): the others' round goes on. A wrong-shape update
    breaks the sum and the round is skipped; a 1000x update is clipped to the SecAgg+ range,
    bounding its influence."""
    config = tiny_config(num_clients=5, clients_per_round=5, num_rounds=3, dp=False, secure_aggregation=True,
                         inject_faults="1:nan:0; 2:wrong-shape:1; 3:scale-1000:2")
    # The real round loop, ClientApps and drills in one process (no Ray: the engine is not the point).
    grid, run_dir = inprocess.federation(config, tmp_path / "run")
    inprocess.run(grid, config, run_dir)
    out = run_dir.path
    first, second, third = read_metrics(out)
    assert first["update_applied"] and first["clients_trained"] == 4 and "client-0" not in first["clients"]
    assert "holds NaN or Inf" in first["secagg_refusals"]["client-0"]
    assert not second["update_applied"] and "could not sum the masked updates" in second["aggregation_failed"]
    assert third["update_applied"] and third["clients"]["client-2"]["update_max_abs"] > 100
    server = _ledger(out, "server")
    assert server[0]["adapter_sha256"] == server[1]["adapter_sha256"] != server[2]["adapter_sha256"]
    splits = federated_splits(config)
    clip = secagg_parameters(config=config, max_client_examples=splits.max_client_examples).clipping_range
    initial = initial_adapter(config)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(saved_adapter_arrays(out, num_labels=3), initial))
    # each applied mean (rounds 1 and 3) moves a coordinate at most the clipping range
    assert 0 < moved <= 2 * clip * 1.01
    assert "was clipped" in caplog.text


def _resume(out: Path) -> subprocess.CompletedProcess:
    result = fedtune("simulate", "--engine", "in-process", "--resume", str(out), "--set", "inject-faults=")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_coordinator_killed_mid_round_resumes_without_counting_a_round_twice(tiny_config, tmp_path):
    """Killed after every client trained round 2 but before the checkpoint: the resumed run asks
    for round 2 again, the clients re-send what they already paid for, and epsilon ends exactly
    where an uninterrupted run ends. (Plain FedAvg: under SecAgg+ an update that left a node
    masked never goes into a second session, tests/test_secagg_sessions.py.)"""
    config = tiny_config(num_clients=3, clients_per_round=3, num_rounds=3, dp=True, secure_aggregation=False)
    out = tmp_path / "run"
    with pytest.raises(CoordinatorKilled, match="after round 2's replies"):  # where a real process is SIGKILLed
        _simulate(out, config, inject_faults="2:crash-coordinator")
    assert Checkpoint.load(out).completed_round == 1 and not (out / "summary.json").exists()
    assert [m["round"] for m in read_metrics(out)] == [1]
    for partition in range(3):  # round 2 was trained and signed before the crash
        assert [r["round"] for r in _ledger(out, f"client-{partition}")] == [1, 2]

    result = _resume(out)
    assert "Resuming" in result.stdout and "re-sent after the resume" in result.stdout
    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [1, 2, 3] and all(m["update_applied"] for m in metrics)
    assert all(c.get("resent") for c in metrics[1]["clients"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["resumed_after_round"] == 1
    for partition in range(3):
        records = _ledger(out, f"client-{partition}")
        assert [r["round"] for r in records] == [1, 2, 3]  # one signed spend per round, none twice
        assert len({r["run_id"] for r in records}) == 1
        uninterrupted = _planned_epsilon(config, partition, 3)
        assert records[-1]["epsilon"] == pytest.approx(uninterrupted, rel=1e-9)
        assert summary["epsilon"][f"client-{partition}"] == pytest.approx(uninterrupted, rel=1e-9)
    assert [r["round"] for r in _ledger(out, "server")] == [1, 2, 3]
    _audit_clean(out)


def test_the_crash_drill_sigkills_a_real_coordinators_own_process(monkeypatch):
    """On Flower's engines the drill is a real SIGKILL of the coordinator's process, after the
    round's replies and before its checkpoint (the in-process engine raises CoordinatorKilled)."""
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

    import fedtune.server.drills as server_drills

    signals, fitted = [], []
    monkeypatch.setattr(server_drills.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    workflow = server_drills.crash_after_fit(lambda grid, context: fitted.append(grid), spec="2:crash-coordinator")
    grid = object()  # a grid in another process than the caller's: no kill_coordinator
    for server_round in (1, 2):
        workflow(grid, SimpleNamespace(state=SimpleNamespace(
            config_records={MAIN_CONFIGS_RECORD: {Key.CURRENT_ROUND: server_round}})))
        assert len(fitted) == server_round  # the round's fit ran first
        assert signals == ([(os.getpid(), signal.SIGKILL)] if server_round == 2 else [])


def test_killed_right_after_a_checkpoint_the_resumed_run_is_bit_identical(tiny_config, tmp_path):
    """Without DP noise or SecAgg+ rounding, training is deterministic: a run SIGKILLed from
    outside right after its first checkpoint, then resumed, ends with the same adapter bytes. The
    kill needs a real process (the in-process engine in it: Ray is not the subject)."""
    config = tiny_config(num_clients=3, clients_per_round=3, num_rounds=3, dp=False, secure_aggregation=False)
    reference = tmp_path / "reference"
    assert _simulate(reference, config).returncode == 0

    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "fedtune", "simulate", "--engine", "in-process",
                                "--out", str(out), *_args(config)], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while not (out / "checkpoint.npz").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    killed_after = Checkpoint.load(out).completed_round
    assert killed_after < 3 and not (out / "summary.json").exists()

    _resume(out)
    assert [m["round"] for m in read_metrics(out)] == [1, 2, 3]
    assert [r["round"] for r in _ledger(out, "server")] == [1, 2, 3]
    for got, want in zip(saved_adapter_arrays(out, num_labels=3), saved_adapter_arrays(reference, num_labels=3)):
        assert np.array_equal(got, want)
    assert _ledger(out, "server")[-1]["adapter_sha256"] == _ledger(reference, "server")[-1]["adapter_sha256"]
    _audit_clean(out)


def test_resume_refuses_what_it_cannot_continue(tiny_config, tmp_path):
    not_a_run = fedtune("simulate", "--resume", str(tmp_path))
    assert not_a_run.returncode == 3 and "not a fedtune run directory" in not_a_run.stderr
    (tmp_path / "config.toml").write_text('dp = true\n')
    (tmp_path / "run.json").write_text('{"run_id": "x"}\n')
    changed = fedtune("simulate", "--resume", str(tmp_path), "--set", "target-epsilon=100")
    assert changed.returncode == 3 and "only inject-faults, round-timeout may change" in changed.stderr
    (tmp_path / "summary.json").write_text("{}")
    finished = fedtune("simulate", "--resume", str(tmp_path))
    assert finished.returncode == 3 and "finished run" in finished.stderr
