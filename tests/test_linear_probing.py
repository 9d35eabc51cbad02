"""Private linear probing and the two-stage mode: exact per-example gradients on the head, training
that learns under DP, a two-stage budget accounted as one history (checked against Google's
dp_accounting), early stopping that leaves budget unspent, and adapters that load elsewhere.

The federations run in one process (simulations/inprocess.py: the real ServerApp round loop and
ClientApp, every message serialized as Flower does) on the tiny BERT, SecAgg+ included.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, pld

from fedtune.client.fl_client import FedtuneClient
from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.client.probe_round import head_loss
from fedtune.common.config import RunConfig
from fedtune.common.ledger.audit import audit_run
from fedtune.common.models.adapter import adapter_to_arrays, arrays_to_adapter
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings
from fedtune.common.models.pooled_classifier import HeadSettings, build_pooled_classifier, head_linear, trained_pooling
from fedtune.common.models.pooled_features import pooled_features
from fedtune.common.privacy.plan import privacy_schedule
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks import get_task
from fedtune.common.tasks.classification import encode
from fedtune.simulations.inprocess import federation, metrics, run
from tests.conftest import initial_adapter
from tests.helpers import ROOT, fedtune



def _probe_model(model_dir, *, freeze_lora: bool = True, prior=()):
    return build_pooled_classifier(model_path=model_dir, num_labels=3, lora=LoraSettings(rank=4), seed=0,
                                   pooling="mean", freeze_lora=freeze_lora, prior=prior,
                                   tokenizer=load_tokenizer(model_dir) if prior else None)


def _pld_epsilons(rounds: list[tuple[float, float, int]], delta: float) -> list[float]:
    """Epsilon after each round of (sigma, q, steps), by dp_accounting's PLD accountant: a separate
    implementation from the Opacus PRV accountant fedtune calibrates and guards with."""
    accountant, out = pld.PLDAccountant(), []
    for sigma, rate, steps in rounds:
        step = dp_event.GaussianDpEvent(sigma) if rate >= 1.0 else \
            dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma))
        accountant.compose(dp_event.SelfComposedDpEvent(step, steps))
        out.append(accountant.get_epsilon(delta))
    return out


# -- the head-only mode ------------------------------------------------------------------------

def test_in_probe_mode_only_the_head_trains_and_travels(tiny_model_dir):
    model = _probe_model(tiny_model_dir)
    arrays = adapter_to_arrays(model)
    head = head_linear(model)
    assert [a.shape for a in arrays] == [tuple(head.weight.shape), tuple(head.bias.shape)]
    two_stage = _probe_model(tiny_model_dir, freeze_lora=False)
    assert len(adapter_to_arrays(two_stage)) > 2  # LoRA travels too, from the first round on


def test_the_head_rounds_per_sample_gradients_equal_single_example_gradients_through_the_whole_model(
        tiny_model_dir, tiny_config):
    """What Opacus clips in a probe round (per-example gradients of the head on cached features) is
    exactly each record's own gradient through encoder, pooling and head."""
    from opacus import GradSampleModule

    config = tiny_config()
    split = federated_splits(config).clients[0].train
    dataset = encode(tokenizer=load_tokenizer(tiny_model_dir), split=split, max_length=config.max_length)
    batch = dataset[:6]
    model = _probe_model(tiny_model_dir).eval()
    features = pooled_features(model, torch.utils.data.TensorDataset(*batch))
    head = GradSampleModule(copy.deepcopy(head_linear(model)).train(), batch_first=True, loss_reduction="mean")
    head_loss(head, *features.tensors).backward()
    per_sample = [p.grad_sample for p in head.parameters()]
    for i in range(6):
        model.zero_grad()
        logits = model(input_ids=batch[0][i:i + 1], attention_mask=batch[1][i:i + 1]).logits
        torch.nn.functional.cross_entropy(logits, batch[2][i:i + 1]).backward()
        single = [head_linear(model).weight.grad, head_linear(model).bias.grad]
        for mine, theirs in zip(per_sample, single, strict=True):
            assert torch.allclose(mine[i], theirs, atol=1e-6)


@pytest.mark.slow
def test_a_probe_client_learns_under_dp_and_spends_what_an_independent_accountant_says(tmp_path):
    """One BBC News client alone (345 records, MiniLM), epsilon 4 over 3 rounds, from a zero head:
    far above chance, and each round's epsilon is dp_accounting's for the plan it signed."""
    config = RunConfig(training_mode="probe", head_prior=False, num_rounds=3, target_epsilon=4.0, max_length=64,
                       secure_aggregation=False)
    task, splits = get_task("classification"), federated_splits(config)
    server_model = task.build_model(model_path=task.model_path(config.model), num_labels=5,
                                    lora=LoraSettings.from_config(config), seed=0, head=HeadSettings.from_config(config))
    test = encode(tokenizer=load_tokenizer(task.model_path(config.model)), split=splits.test, max_length=64)
    before = task.evaluate(model=server_model, dataset=test)["accuracy"]
    parameters, reported = adapter_to_arrays(server_model), []
    for server_round in (1, 2, 3):
        client = FedtuneClient(config=config, partition_id=0, ledger_dir=tmp_path, run_id="run-1")
        update, n, report = client.fit(parameters, {"server-round": server_round})
        assert report["status"] == "trained" and report["sample_rate"] == 1.0 and report["steps"] == 16
        parameters = [p + u for p, u in zip(parameters, update)]
        reported.append(report["epsilon"])
    arrays_to_adapter(server_model, parameters)
    after = task.evaluate(model=server_model, dataset=test)["accuracy"]
    assert before < 0.4 and after >= 0.8, (before, after)
    plan = ClientPrivacyLedger(directory=tmp_path, client_id="client-0").plan_for("run-1")
    independent = _pld_epsilons([(plan.noise_multiplier, 1.0, 16)] * 3, 1e-5)
    assert reported == pytest.approx(independent, rel=0.02)
    assert reported[-1] <= 4.0


# -- the two-stage plan ------------------------------------------------------------------------

@pytest.mark.parametrize("epsilon,probe_rounds,share", [(1.0, 1, 0.5), (3.0, 1, 0.3), (8.0, 2, 0.5)])
def test_the_two_stage_plans_per_round_epsilons_match_dp_accounting_pld(epsilon, probe_rounds, share):
    schedule = privacy_schedule(dataset_size=345, batch_size=64, local_epochs=1, rounds=4, target_epsilon=epsilon,
                                delta=1e-5, training_mode="two-stage", probe_rounds=probe_rounds,
                                probe_steps=16, probe_share=share)
    rows = schedule["rounds"]
    assert [r["stage"] for r in rows] == ["probe"] * probe_rounds + ["adapter"] * (4 - probe_rounds)
    assert all(r["sample_rate"] == 1.0 for r in rows[:probe_rounds])
    independent = _pld_epsilons([(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows], 1e-5)
    assert [r["epsilon"] for r in rows] == pytest.approx(independent, rel=0.02)
    assert rows[probe_rounds - 1]["epsilon"] == pytest.approx(share * epsilon, rel=0.02)  # the declared split
    assert epsilon * 0.97 <= rows[-1]["epsilon"] <= epsilon and not any(r["client_refuses"] for r in rows)


def test_fedtune_plan_shows_each_rounds_stage_and_what_a_stop_after_it_leaves():
    result = fedtune("plan", "--dataset-size", "345", "--mode", "two-stage", "--target-epsilon", "3",
                         "--rounds", "3", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [r["stage"] for r in plan["rounds"]] == ["probe", "adapter", "adapter"]
    assert plan["probe"]["steps_per_round"] == 16 and plan["rounds"][0]["sample_rate"] == 1.0
    table = fedtune("plan", "--dataset-size", "345", "--mode", "two-stage", "--target-epsilon", "3")
    assert table.returncode == 0 and "probe round 1:" in table.stdout and "budget left" in table.stdout
    first = next(line for line in table.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "probe" in first and f"{3 - plan['rounds'][0]['epsilon']:.4f}" in first  # left after a stop at 1
    for epsilon in ("1", "8"):  # without --mode, the plan is of what a run with this budget trains
        unset = fedtune("plan", "--dataset-size", "345", "--target-epsilon", epsilon, "--json")
        assert unset.returncode == 0, unset.stderr
        run_mode = RunConfig.load(overrides=[f"target-epsilon={epsilon}"]).training_mode
        assert json.loads(unset.stdout)["training_mode"] == run_mode


def test_a_two_stage_client_signs_each_stage_and_its_ledger_audits_against_pld(tiny_config, tmp_path):
    config = tiny_config(training_mode="two-stage", num_rounds=3, probe_rounds=1, target_epsilon=4.0)
    parameters = adapter_to_arrays(get_task("classification").build_model(
        model_path=Path(config.model), num_labels=3, lora=LoraSettings.from_config(config),
        seed=0, head=HeadSettings.from_config(config)))
    updates = []
    for server_round in (1, 2, 3):
        client = FedtuneClient(config=config, partition_id=0, ledger_dir=tmp_path, run_id="run-1")
        update, _, report = client.fit(parameters, {"server-round": server_round})
        assert report["status"] == "trained"
        updates.append(update)
        parameters = [p + u for p, u in zip(parameters, update)]
    assert all(not u.any() for u in updates[0][:-2]) and updates[0][-1].any()  # round 1 moved the head only
    assert any(u.any() for u in updates[1][:-2])  # round 2 trained LoRA too
    records = ClientPrivacyLedger(directory=tmp_path, client_id="client-0").ledger.records
    assert [r["sample_rate"] == 1.0 for r in records] == [True, False, False]
    independent = _pld_epsilons([(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in records], 1e-5)
    assert [r["epsilon"] for r in records] == pytest.approx(independent, rel=0.02)
    assert records[0]["epsilon"] == pytest.approx(0.5 * 4.0, rel=0.02) and records[-1]["epsilon"] <= 4.0


@pytest.mark.slow
def test_a_hostile_two_stage_job_cannot_take_a_node_past_its_own_budget(tiny_config, tmp_path):
    """The coordinator chooses the mode and the split, not the budget: a job putting 99% of the
    node's epsilon 2 into 200-step probe rounds still composes into one history under 2, and a
    job asking for more epsilon than the node's policy is refused before any record is read."""
    from fedtune.common.privacy.policy import NodePolicy

    greedy = tiny_config(training_mode="two-stage", num_rounds=3, probe_rounds=2, target_epsilon=50.0)
    client = FedtuneClient(config=greedy, partition_id=0, ledger_dir=tmp_path / "greedy", run_id="run-0",
                           policy=NodePolicy(target_epsilon=2.0))
    assert client.fit(initial_adapter(tiny_config()), {"server-round": 1})[2]["status"] == "refused-policy"
    job = tiny_config(training_mode="two-stage", num_rounds=3, probe_rounds=2, probe_epsilon_share=0.99,
                      probe_steps=200, target_epsilon=2.0)
    parameters = adapter_to_arrays(get_task("classification").build_model(
        model_path=Path(job.model), num_labels=3, lora=LoraSettings.from_config(job), seed=0,
        head=HeadSettings.from_config(job)))
    for bad_round in (0, -3):  # a round no plan has: it would be checked as one stage and trained as another
        zero = FedtuneClient(config=job, partition_id=0, ledger_dir=tmp_path / "zero", run_id="run-z",
                             policy=NodePolicy(target_epsilon=2.0)).fit(parameters, {"server-round": bad_round})
        assert zero[1] == 0 and zero[2]["status"] == "refused-policy" and "1 or more" in zero[2]["reason"]
    spent = []
    for server_round in (1, 2, 3):
        client = FedtuneClient(config=job, partition_id=0, ledger_dir=tmp_path, run_id="run-1",
                               policy=NodePolicy(target_epsilon=2.0))
        update, _, report = client.fit(parameters, {"server-round": server_round})
        assert report["status"] == "trained" and len(update) == len(parameters)
        spent.append(report["epsilon"])
    records = ClientPrivacyLedger(directory=tmp_path, client_id="client-0").ledger.records
    assert all(r["target_epsilon"] == 2.0 for r in records) and max(spent) <= 2.0
    assert _pld_epsilons([(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in records], 1e-5)[-1] <= 2.0


# -- federations: early stopping, adapters in a fresh process ----------------------------------

FRESH_PROCESS = textwrap.dedent("""
    # A user's new interpreter: the exported folders and the standard SetFit call, nothing of fedtune.
    import json, sys
    from setfit import SetFitModel
    base, jobs, predictions = sys.argv[1], json.load(sys.stdin), {}
    for folder, texts in jobs.items():
        predictions[folder] = list(SetFitModel.from_pretrained(folder).predict(texts))
        for wrong in ("transformers", "peft"):  # the standard calls for other architectures fail loudly
            try:
                from peft import PeftModel
                from transformers import AutoModelForSequenceClassification
                if wrong == "transformers":
                    AutoModelForSequenceClassification.from_pretrained(folder)
                else:
                    PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), folder)
                predictions[folder + wrong] = "loaded"
            except (OSError, ValueError) as exc:
                predictions[folder + wrong] = type(exc).__name__
    print(json.dumps(predictions))
""")
MODES = ("probe", "two-stage")


@pytest.fixture(scope="module")
def each_modes_run_and_fresh_predictions(tiny_config, tmp_path_factory):
    """A finished run of each mode, and what one fresh process (a user's new interpreter: the
    adapter folder and the base, nothing of the run) predicts on the test split with each adapter."""
    runs = {}
    for mode in MODES:
        # In float32: a bf16 run's export agrees only up to near ties (sentence-transformers pads to
        # the batch's longest text and pools and normalises in bf16; two-stage merges LoRA in fp32),
        # measured 1 of 60 test predictions apart in CI.
        config = tiny_config(training_mode=mode, num_rounds=2, probe_rounds=1, secure_aggregation=True,
                             base_dtype="float32")
        grid, run_dir = federation(config, tmp_path_factory.mktemp(mode) / "run")
        runs[mode] = (config, run_dir, run(grid, config, run_dir))
    splits = federated_splits(runs[MODES[0]][0])
    jobs = {str(run_dir.adapter_dir): list(splits.test.texts) for _, run_dir, _ in runs.values()}
    completed = subprocess.run([sys.executable, "-c", FRESH_PROCESS, runs[MODES[0]][0].model],
                               input=json.dumps(jobs), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    predicted = json.loads(completed.stdout.strip().splitlines()[-1])
    return {mode: (config, run_dir, summary, predicted[str(run_dir.adapter_dir)],
                   [predicted[str(run_dir.adapter_dir) + wrong] for wrong in ("transformers", "peft")])
            for mode, (config, run_dir, summary) in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_each_modes_adapter_loads_in_a_fresh_process_and_predicts_as_the_run_scored(
        mode, each_modes_run_and_fresh_predictions):
    config, run_dir, summary, predicted, wrong_ways = each_modes_run_and_fresh_predictions[mode]
    assert summary["rounds_completed"] == 2
    splits = federated_splits(config)
    truth = [splits.label_names[y] for y in splits.test.labels]
    assert len(predicted) == len(truth)
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert wrong_ways == ["ValueError", "ValueError"]  # not "loaded" under a random head, with warnings
    pooling = json.loads((run_dir.adapter_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "mean"
    assert "SetFitModel.from_pretrained" in (run_dir.adapter_dir / "README.md").read_text()
    audit = audit_run(target=run_dir.path)
    assert audit.exit_code == 0, audit.problems


def test_an_early_stopped_run_ends_every_ledger_at_the_stop_and_leaves_budget_unspent(tiny_config, tmp_path):
    # A step size of ~0 never improves the coordinator's validation score after round 1: patience 1
    # stops the run after round 2 of 5.
    config = tiny_config(training_mode="probe", num_rounds=5, probe_learning_rate=1e-12, early_stopping_patience=1,
                         target_epsilon=4.0, secure_aggregation=True)
    grid, run_dir = federation(config, tmp_path / "run")
    summary = run(grid, config, run_dir)
    assert summary["rounds_completed"] == 2
    assert summary["stopped_early"]["after_round"] == 2 and "not improved" in summary["stopped_early"]["reason"]
    rounds = metrics(run_dir.path)
    assert [r["round"] for r in rounds] == [1, 2] and "validation_accuracy" in rounds[0]
    server = [json.loads(line) for line in (run_dir.path / "ledgers" / "server" / "ledger.jsonl").read_text()
              .splitlines()]
    assert [r.get("round") for r in server if "event" not in r] == [1, 2]
    assert "stopped_early" in [r for r in server if "event" not in r][-1]
    for cid in ("client-0", "client-1"):
        records = ClientPrivacyLedger(directory=run_dir.path / "ledgers" / cid, client_id=cid).ledger.records
        assert [r["round"] for r in records] == [1, 2]
        assert records[-1]["budget_remaining"] > 0.4 * 4.0  # three of five rounds' budget unspent
    audit = audit_run(target=run_dir.path)
    assert audit.exit_code == 0, audit.problems


def test_the_coordinators_validation_split_is_carved_only_when_early_stopping_is_on(tiny_config):
    off, on = federated_splits(tiny_config()), federated_splits(tiny_config(early_stopping_patience=2))
    total = len(on.test) + len(on.validation) + sum(len(c.train) + len(c.validation) for c in on.clients)
    assert off.validation is None and len(on.validation) == round(total * 0.05) > 0
    assert off.test.texts == on.test.texts  # the test split never moves
    pooled_on = {t for c in on.clients for t in c.train.texts + c.validation.texts}
    assert not pooled_on & set(on.validation.texts) and not set(on.test.texts) & set(on.validation.texts)


def test_the_trained_pooling_is_read_from_the_sentence_transformers_config(tmp_path, tiny_model_dir):
    from fedtune.common.tasks import resolve_model_path

    assert trained_pooling(resolve_model_path("default")) == "mean"
    assert trained_pooling(tiny_model_dir) == "mean"  # no sentence-transformers config: mean
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert trained_pooling(tmp_path) == "cls"


def test_the_audit_refuses_an_early_stop_the_signed_scores_do_not_support_or_that_hides_rounds():
    from fedtune.common.ledger.stop_checks import early_stop_problems

    def server(scores, *, patience=1):
        rounds = [{"round": i + 1, "validation_accuracy": s, "early_stopping_patience": patience}
                  for i, s in enumerate(scores)]
        rounds[-1]["stopped_early"] = "validation accuracy has not improved"
        return rounds

    client = {"client-0": [{"run_id": "r", "round": 1}, {"run_id": "r", "round": 2}]}
    assert early_stop_problems(server([0.5, 0.5]), client, "r") == []  # no improvement for 1 round: stop
    assert "last improved at round 2" in early_stop_problems(server([0.5, 0.6]), client, "r")[0]
    assert "last improved" in early_stop_problems(server([0.5, 0.5], patience=2), client, "r")[0]
    late = {"client-0": [*client["client-0"], {"run_id": "r", "round": 3}]}
    assert "signed round(s) 3 of this run after the server's early stop" in early_stop_problems(
        server([0.5, 0.5]), late, "r")[0]
    middle = server([0.5, 0.5]) + [{"round": 3, "validation_accuracy": 0.4}]
    assert "not only at its last round" in early_stop_problems(middle, client, "r")[0]
    unsigned = server([0.5, 0.5])
    del unsigned[-1]["early_stopping_patience"]
    assert "names no early-stopping-patience" in early_stop_problems(unsigned, client, "r")[0]


@pytest.mark.slow
def test_fedtune_predict_prints_the_labels_the_standard_load_predicts(each_modes_run_and_fresh_predictions, tmp_path):
    """`fedtune predict` on a probe run's export: one label per text of a plain file, in order, the
    same as `SetFitModel.from_pretrained(...).predict`; a folder that is no classifier is refused."""
    config, run_dir, _, predicted, _ = each_modes_run_and_fresh_predictions["probe"]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t.replace("\n", " ") for t in federated_splits(config).test.texts) + "\n")
    result = fedtune("predict", str(run_dir.adapter_dir), "--file", str(texts))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:-1] == predicted
    refused = fedtune("predict", str(tmp_path), "--text", "hello")
    assert refused.returncode == 3 and "not an exported fedtune classifier" in refused.stderr

    # SetFit's head file is a pickle: one a hostile coordinator planted would run code when
    # unpickled. `fedtune predict` reads the head from safetensors and never opens it.
    import pickle
    import shutil

    planted, marker = tmp_path / "planted", tmp_path / "pickle-ran"
    shutil.copytree(run_dir.adapter_dir, planted)

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (planted / "model_head.pkl").write_bytes(pickle.dumps(Payload()))
    again = fedtune("predict", str(planted), "--file", str(texts))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.split("\n")[:-1] == predicted and not marker.exists()
