"""End to end: real `fedtune simulate` runs on a tiny model: the product's configuration (SecAgg+
and DP) once on Flower's simulation engine (Ray) in a subprocess, the rest on the in-process engine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtune.common.ledger.audit import audit_run
from fedtune.common.privacy.accounting import epsilon_of
from fedtune.common.privacy.plan import plan_privacy
from fedtune.common.run_data import federated_splits
from fedtune.server.secure_aggregation import secagg_parameters
from fedtune.simulations import inprocess
from tests.conftest import initial_adapter
from tests.ray_cluster import ray_cluster
from tests.helpers import ROOT, fedtune, progress_table, read_metrics, run_fedtune, set_args

pytestmark = pytest.mark.slow


def _simulate_on_ray(out: Path, config, **keys) -> subprocess.CompletedProcess:
    """The suite's one `fedtune simulate` on Ray: the real command in a new process."""
    base = dict(model=config.model, data=config.data, num_clients=config.num_clients,
                clients_per_round=config.clients_per_round, batch_size=config.batch_size,
                max_length=config.max_length, learning_rate=config.learning_rate,
                head_learning_rate=config.head_learning_rate, lora_variant=config.lora_variant, lora_rank=config.lora_rank,
                target_epsilon=config.target_epsilon, training_mode=config.training_mode)
    base.update(keys)
    result = run_fedtune("simulate", "--out", str(out), *set_args(**base), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _in_process(config, run_dir: Path) -> Path:
    grid, directory = inprocess.federation(config, run_dir)
    inprocess.run(grid, config, directory)
    return directory.path


@pytest.fixture(scope="module")
def ray_run(tiny_config, tmp_path_factory):
    """SecAgg+ and DP, the product's configuration, in a real `fedtune simulate` on Flower's engine
    (Ray), attached to a Ray cluster started as a user starts one (`ray start --head`, `ray-address`):
    the clients are the cluster's actors, and the cluster outlives the run (Flower disconnects).
    A simulation starting its own Ray is the demo's path, and the Ctrl-C test's."""
    config = tiny_config(num_clients=3, clients_per_round=3, dp=True, secure_aggregation=True, num_rounds=1,
                         fraction_evaluate=1.0)
    out = tmp_path_factory.mktemp("run") / "secagg-dp"
    with ray_cluster() as cluster:
        assert {"raylet", "gcs_server"} <= cluster.names()
        _simulate_on_ray(out, config, dp=True, secure_aggregation=True, num_rounds=1, num_clients=3,
                         clients_per_round=3, fraction_evaluate=1.0, ray_address=cluster.address)
        # one actor per core of the cluster's 2 (attached: one core a client, not this machine's share)
        assert len(cluster.actor_logs("ClientAppActor")) == 2
        assert cluster.head.poll() is None and {"raylet", "gcs_server"} <= cluster.names()
        cluster.stop()
        assert cluster.processes() == [], [(p.pid, p.name()) for p in cluster.processes()]
    return config, out


@pytest.fixture(scope="module")
def plain_and_secagg_runs(tiny_config, tmp_path_factory):
    """The same non-private federation twice (training is deterministic, DP noise is not): SecAgg+
    and plain FedAvg, from the same round loop and ClientApps in one process."""
    config = tiny_config(num_clients=3, clients_per_round=3, dp=False, num_rounds=1, fraction_evaluate=1.0)
    root = tmp_path_factory.mktemp("run")
    return config, {True: _in_process(config.with_overrides(secure_aggregation=True), root / "secagg"),
                    False: _in_process(config.with_overrides(secure_aggregation=False), root / "plain")}


def test_secagg_aggregate_equals_plain_fedavg_within_quantization_error(plain_and_secagg_runs):
    config, runs = plain_and_secagg_runs
    plain, secure = _adapter(runs[False]), _adapter(runs[True])
    assert plain.keys() == secure.keys()
    splits = federated_splits(config.with_overrides(num_clients=3, clients_per_round=3))
    params = secagg_parameters(config=config.with_overrides(num_clients=3, clients_per_round=3),
                               max_client_examples=splits.max_client_examples)
    smallest_weight = min(len(c.train) for c in splits.clients) / params.max_weight
    # stochastic rounding moves each client's weighted value by < one step; 3 clients, then
    # divided by the summed weights (>= 3 x the smallest)
    step = 2 * params.clipping_range / 2**22
    bound = 3 * step / (3 * smallest_weight) + 1e-6
    assert len(plain) == len(initial_adapter(config))
    for key in plain:
        gap = float(np.abs(plain[key] - secure[key]).max())
        assert gap <= bound, f"{key}: SecAgg+ differs from FedAvg by {gap:.3g} > {bound:.3g}"
    # LoRA B starts at zero, so this shows the round trained and the comparison is not vacuous
    lora_b = [k for k in plain if "lora_B" in k]
    assert lora_b and all(np.abs(plain[k]).max() > 100 * bound for k in lora_b)
    for metrics in (read_metrics(runs[False]), read_metrics(runs[True])):
        assert metrics[0]["clients_trained"] == 3
    # masked int64 words travel under SecAgg+, float32 values on the plain path
    assert read_metrics(runs[True])[0]["bytes_up_per_client"] > read_metrics(runs[False])[0]["bytes_up_per_client"]


def test_run_directory_holds_config_metrics_summary_and_a_loadable_adapter(ray_run):
    config, run = ray_run
    resolved = (run / "config.toml").read_text()
    assert 'secure-aggregation = true' in resolved and 'dp = true' in resolved
    assert f'model = "{config.model}"' in resolved
    [record] = read_metrics(run)
    for key in ("round", "test_loss", "test_accuracy", "test_macro_f1", "seconds", "bytes_up_per_client",
                "clients"):
        assert key in record
    assert sorted(record["clients"]) == ["client-0", "client-1", "client-2"]
    for entry in record["clients"].values():
        assert entry["status"] == "trained" and entry["num_examples"] > 0 and entry["steps"] > 0
        assert 0.0 <= entry["val_accuracy"] <= 1.0 and entry["val_loss"] > 0  # clients evaluated
        assert 0 < entry["epsilon"] <= config.target_epsilon
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["secure_aggregation"] is True
    assert summary["dp"] is True and summary["test_accuracy"] == record["test_accuracy"]
    assert summary["epsilon"] == {cid: entry["epsilon"] for cid, entry in record["clients"].items()}
    assert audit_run(target=run).to_json()["exit_code"] == 0  # the signed ledgers Ray's actors wrote audit clean

    # A fresh process loads the adapter the way a user would and gets the reported accuracy.
    script = textwrap.dedent(f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        from fedtune.common.config import RunConfig
        from fedtune.common.tasks.classification import evaluate_classifier
        from fedtune.common.models.loading import load_tokenizer
        from fedtune.common.run_data import federated_splits
        from fedtune.common.tasks.classification import encode
        cfg = RunConfig.load(path={str(run / 'config.toml')!r})
        # in the precision the run computed in, as the model card says (bf16 on this CPU under auto)
        base = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=3,
                                                                  dtype=cfg.profile.torch_dtype())
        model = PeftModel.from_pretrained(base, {str(run / 'adapter')!r})
        tok = load_tokenizer({str(run / 'adapter')!r})
        test = encode(tokenizer=tok, split=federated_splits(cfg).test, max_length=cfg.max_length)
        print(json.dumps(evaluate_classifier(model=model, dataset=test)))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-9)
    # Loaded the plain PEFT way on a bf16 base, the head is a bf16 copy of the trained fp32 one (the
    # run keeps it fp32): the same predictions, the loss to a few parts in 1e5 (4e-5 measured).
    assert scores["loss"] == pytest.approx(record["test_loss"], rel=1e-3)


def test_budget_guard_refuses_and_the_server_stops_cleanly(tiny_config, tmp_path):
    config = tiny_config(num_clients=2, clients_per_round=2, target_epsilon=3.0)
    n = len(federated_splits(config).clients[0].train)
    # sigma that spends the whole budget in one round: round 2 must be refused by everyone
    sigma = plan_privacy(num_examples=n, batch_size=config.batch_size, local_epochs=1, num_rounds=1,
                         target_epsilon=3.0, target_delta=config.target_delta).noise_multiplier
    config = config.with_overrides(num_rounds=4, noise_multiplier=sigma, dp=True, secure_aggregation=True)
    # The real round loop and ClientApps in one process, with `fedtune simulate`'s table.
    grid, run_dir = inprocess.federation(config, tmp_path / "run")
    table, shown = progress_table(config)
    inprocess.run(grid, config, run_dir, on_round=table.add)
    out = run_dir.path
    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [1, 2]  # stopped after the round nobody could train
    first, second = metrics
    assert first["clients_trained"] == 2 and first["update_applied"]
    assert second["clients_trained"] == 0 and not second["update_applied"]
    for cid in ("client-0", "client-1"):
        assert first["clients"][cid]["status"] == "trained"
        refused = second["clients"][cid]
        assert refused["status"] == "refused-budget" and refused["num_examples"] == 0 and refused["steps"] == 0
        assert refused["epsilon"] == first["clients"][cid]["epsilon"] <= 3.0  # spent, not spent again
    assert second["test_accuracy"] == first["test_accuracy"]  # nothing was applied
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert all(eps <= 3.0 for eps in summary["epsilon"].values())
    assert "round" in shown.getvalue() and "2/2" in shown.getvalue() and "0/2" in shown.getvalue()
    # the refusals are in the signed ledgers too, and the whole run audits clean
    audit = fedtune("audit", str(out), "--json")
    assert audit.returncode == 0, audit.stdout[-3000:]
    statuses = sorted((r["client_id"], r["round"], r["status"]) for r in json.loads(audit.stdout)["rows"])
    assert statuses == [("client-0", 1, "trained"), ("client-0", 2, "refused-budget"),
                        ("client-1", 1, "trained"), ("client-1", 2, "refused-budget")]


def test_secagg_never_unmasks_the_update_of_a_single_trained_client(tiny_config, tmp_path):
    """Two of three clients refuse: the lone trained update must not be revealed as a 'sum'."""
    config = tiny_config(num_clients=3, clients_per_round=3, partitioner="dirichlet", dirichlet_alpha=0.3)
    sizes = [len(c.train) for c in federated_splits(config).clients]
    sigma = 1.0
    first_round = sorted(
        (epsilon_of([plan_privacy(num_examples=n, batch_size=config.batch_size, local_epochs=1, num_rounds=1,
                                  target_epsilon=100.0, target_delta=1e-5, noise_multiplier=sigma).round_entry(1)],
                    delta=1e-5), cid) for cid, n in enumerate(sizes))
    assert first_round[1][0] > 1.05 * first_round[0][0], sizes  # the partition gives distinct budgets
    budget = (first_round[0][0] + first_round[1][0]) / 2  # only the largest client can afford a round
    lone = f"client-{first_round[0][1]}"
    # The real round loop and ClientApps in one process (no Ray: nothing here is about the engine).
    config = config.with_overrides(num_rounds=1, dp=True, secure_aggregation=True, noise_multiplier=sigma,
                                   target_epsilon=budget)
    grid, run_dir = inprocess.federation(config, tmp_path / "run")
    inprocess.run(grid, config, run_dir)
    out = run_dir.path
    [record] = read_metrics(out)
    assert record["clients_trained"] == 1 and record["clients"][lone]["status"] == "trained"
    assert sum(c["status"] == "refused-budget" for c in record["clients"].values()) == 2
    assert not record["update_applied"] and "only one client trained" in record["aggregation_failed"]
    assert not [m for m in grid.sent if m.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
                == Stage.UNMASK]  # the protocol stopped before anyone was asked for key shares
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == summary["initial_test_accuracy"]  # nothing was ever applied
    audit = audit_run(target=out).to_json()
    assert audit["exit_code"] == 0, audit  # the lone client's spend is recorded and counts
