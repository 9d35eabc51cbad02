"""The exported adapter is a complete Hugging Face artifact: label names in its config, a portable
base-model reference with the base's hashes, and a model card stating the privacy guarantee.

The fast tests build cards and adapters directly; one slow test runs the real CLI (in this process,
without Ray) and loads the exported adapter in a fresh process that knows nothing but the adapter
folder and the base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from fedtune.common.config import RunConfig
from fedtune.common.ledger.audit import audit_run
from fedtune.common.models.base_reference import BASE_MODEL_FILE, BaseModelReference, base_model_reference
from fedtune.server.model_card import CardFacts, client_privacy, model_card
from tests.helpers import fedtune, set_args



LABELS = ("1", "2", "10")  # numeric labels, in the order the head's outputs have them


def _entry(status="trained", **values):
    return {"status": status, **values}


ROUNDS = [
    {"round": 1, "clients": {
        "client-0": _entry(epsilon=2.5, noise_multiplier=0.91, sample_rate=0.125, steps=4, num_examples=120),
        "client-1": _entry(epsilon=3.0, noise_multiplier=0.87, sample_rate=0.1, steps=5, num_examples=150)}},
    {"round": 2, "clients": {
        "client-0": _entry(epsilon=3.75, noise_multiplier=0.91, sample_rate=0.125, steps=4, num_examples=120),
        "client-1": _entry("refused-budget", epsilon=3.0, noise_multiplier=0.87, sample_rate=0.1,
                           num_examples=0, reason="budget")}},
]
SUMMARY = {"task": "classification", "rounds_completed": 2, "test_accuracy": 0.8125, "test_macro_f1": 0.8,
           "initial_test_accuracy": 0.3333}


def _facts(config: RunConfig | None = None, *, labels=LABELS) -> CardFacts:
    base = BaseModelReference(name_or_path="sentence-transformers/all-MiniLM-L6-v2", source="packaged",
                              weights_sha256={"model.safetensors": "ab" * 32})
    return CardFacts(config=config or RunConfig(num_clients=2, clients_per_round=2, num_rounds=2), run_id="r1",
                     base=base, label_names=labels, test_records=32, rounds=ROUNDS, summary=SUMMARY,
                     version="0.1.0")


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_client_privacy_keeps_the_latest_report_and_counts_only_trained_rounds():
    first, second = client_privacy(ROUNDS)
    assert (first.client_id, first.epsilon, first.rounds_trained, first.steps, first.train_records) == \
        ("client-0", 3.75, 2, 8, 120)
    # a refusal neither counts as a trained round nor replaces the record count with its weight 0
    assert (second.epsilon, second.rounds_trained, second.steps, second.train_records) == (3.0, 1, 5, 150)


def test_model_card_states_task_base_labels_data_metrics_and_the_runs_guarantee_in_totals():
    card = model_card(_facts())
    meta = _front_matter(card)
    # the facts' run is classification at the default budget: a probe run, exported as a SetFit model
    assert meta["library_name"] == "setfit" and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "# fedtune classifier (SetFit format)" in card and "SetFitModel.from_pretrained(ADAPTER)" in card
    assert "only the linear head over its pooled features trained (no LoRA)" in card and "LoRA variant" not in card
    assert meta["pipeline_tag"] == "text-classification"
    assert {"differential-privacy", "secure-aggregation"} <= set(meta["tags"])
    assert "More Information Needed" not in card
    assert "classification" in card and "ab" * 32 in card and "fedtune 0.1.0" in card
    assert "| 0 | 1 |\n| 1 | 2 |\n| 2 | 10 |" in card  # index -> label name, in head order
    assert "test split: 32 records" in card and "2 of 2 clients trained on their own data" in card
    assert "test_accuracy: 0.8125" in card and "initial_test_accuracy: 0.3333" in card
    assert "one record (one training example) of one client's own data" in card
    assert "delta: 1e-05" in card and "clipping bound C (max-grad-norm): 1" in card
    assert "accountant: prv" in card and "secure aggregation: on (SecAgg+)" in card
    assert "largest epsilon any client spent: 3.75" in card
    # the card travels with the model: no figure from which a client's record count follows, not even a total
    for figure in ("120", "150", "270", "0.125", "| 0.1 |", "0.91", "0.87", "| 8 |", "| 5 |", "client-0", "client-1"):
        assert figure not in card, figure
    assert "q (sample rate)" not in card and "| client |" not in card


def test_model_card_of_a_single_trained_client_states_none_of_its_figures():
    """Only its epsilon (the guarantee); a refusing client's q is not stated either."""
    one = [{"round": 1, "clients": {"client-0": _entry(epsilon=2.0, noise_multiplier=0.9, sample_rate=0.125,
                                                       steps=4, num_examples=120),
                                    "client-1": _entry("refused-budget", epsilon=None, noise_multiplier=0.87,
                                                       sample_rate=0.1311, num_examples=0, reason="budget")}}]
    card = model_card(replace(_facts(), rounds=one))
    assert "1 of 2 clients trained" in card and "largest epsilon any client spent: 2" in card
    for figure in ("120", "0.125", "0.1311", "0.9", "0.87"):
        assert figure not in card, figure


def test_model_card_of_a_causal_lm_without_dp_has_no_labels_and_says_there_is_no_guarantee():
    config = RunConfig(task="causal-lm", dp=False, secure_aggregation=False)
    card = model_card(_facts(config, labels=()))
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "text-generation" and "differential-privacy" not in meta["tags"]
    assert "## Labels" not in card and "AutoModelForCausalLM" in card
    assert "No differential privacy" in card and "secure aggregation: off" in card


def test_model_card_of_a_causal_lm_reports_the_base_models_scores_beside_the_final_ones():
    summary = {"rounds_completed": 3, "test_loss": 2.5, "test_perplexity": 12.18, "base_loss": 3.5,
               "base_perplexity": 33.12}
    card = model_card(replace(_facts(RunConfig(task="causal-lm"), labels=()), summary=summary))
    assert "test_perplexity: 12.1800" in card and "base_perplexity: 33.1200" in card


def test_base_reference_is_the_packaged_name_or_the_users_path_plus_the_weights_hash(tiny_model_dir):
    expected = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    packaged = base_model_reference(model="default", model_path=tiny_model_dir, task="classification")
    assert packaged.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert packaged.weights_sha256 == {"model.safetensors": expected}
    assert base_model_reference(model="default", model_path=tiny_model_dir,
                                task="causal-lm").name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    own = base_model_reference(model="models/mine", model_path=tiny_model_dir, task="classification")
    assert own.name_or_path == "models/mine"  # as the user wrote it, not resolved to an absolute path
    assert own.mismatches(tiny_model_dir) == []


def test_base_reference_tells_a_different_base_apart(tiny_model_dir, tmp_path):
    reference = base_model_reference(model="m", model_path=tiny_model_dir, task="classification")
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "other"))
    with (other / "model.safetensors").open("ab") as handle:
        handle.write(b"\0")
    assert reference.mismatches(other) == ["model.safetensors"]


def _tiny_classifier(model_dir: Path):
    from fedtune.common.execution import ExecutionProfile
    from fedtune.common.models.classifier import build_lora_classifier
    from fedtune.common.models.lora import LoraSettings

    # fp32, as a user loads the adapter: the logits must agree to 1e-6
    return build_lora_classifier(model_path=model_dir, num_labels=len(LABELS), lora=LoraSettings(rank=4), seed=0,
                                 profile=ExecutionProfile(base_dtype="float32"))


def test_saved_adapter_names_its_labels_and_base_and_truncates_like_the_run(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.common.models.adapter import adapter_to_arrays, save_adapter
    from fedtune.common.models.loading import load_tokenizer

    model = _tiny_classifier(tiny_model_dir)
    arrays = adapter_to_arrays(model)
    arrays[-1] += 0.5  # a trained head: a loaded adapter that ignored it would predict otherwise
    reference = base_model_reference(model="default", model_path=tiny_model_dir, task="classification")
    out = tmp_path / "adapter"
    save_adapter(model=model, arrays=arrays, out_dir=out, tokenizer=load_tokenizer(tiny_model_dir), base=reference,
                 label_names=LABELS, max_length=12)
    config = AutoConfig.from_pretrained(out)
    assert [config.id2label[i] for i in range(3)] == list(LABELS) and config.label2id["10"] == 2
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert BaseModelReference.read(out) == reference
    for path in out.iterdir():
        assert ".venv" not in path.read_text(errors="replace"), path.name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 12
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir,
                                                                                          config=config), out).eval()
    batch = tokenizer(["match team goal " * 10, "stock price market"], truncation=True, padding=True,
                      return_tensors="pt")
    assert batch["input_ids"].shape[1] == 12
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)


def test_a_causal_lm_adapter_gets_the_portable_base_but_no_label_config(tiny_causal_lm_dir, tmp_path):
    from fedtune.common.models.adapter import adapter_to_arrays, save_adapter
    from fedtune.common.models.causal_lm import build_lora_causal_lm
    from fedtune.common.models.lora import LoraSettings

    model = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LoraSettings(rank=2), seed=0)
    reference = base_model_reference(model="my-llama", model_path=tiny_causal_lm_dir, task="causal-lm")
    save_adapter(model=model, arrays=adapter_to_arrays(model), out_dir=tmp_path, base=reference,
                 label_names=("weather", "food"))
    assert not (tmp_path / "config.json").exists()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-llama"
    assert (tmp_path / BASE_MODEL_FILE).is_file()


# -- end to end --------------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent("""
    # Knows only the adapter folder and the base model folder: no fedtune import, no run config.
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    adapter, base, texts = sys.argv[1], sys.argv[2], json.load(sys.stdin)
    config = AutoConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, config=config),
                                      adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    with torch.no_grad():
        # padded to max-length as the run's evaluation was: in bf16 another batch shape rounds
        # differently, and a near tie can flip (the README's "up to near ties")
        logits = model(**tokenizer(texts, truncation=True, padding="max_length", return_tensors="pt")).logits
    print(json.dumps([config.id2label[i] for i in logits.argmax(-1).tolist()]))
""")


def _run_evaluation_predictions(run: Path) -> tuple[list[str], list[str], float]:
    """The coordinator's own evaluation of the final global adapter, rebuilt as the server builds it:
    (test texts, predicted label names, accuracy)."""
    import torch

    from fedtune.common.models.adapter import arrays_to_adapter
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.run_data import federated_splits
    from fedtune.common.tasks import get_task
    from fedtune.server.checkpoint import Checkpoint

    config = RunConfig.load(path=run / "config.toml")
    task, splits = get_task(config.task), federated_splits(config)
    model_path = task.model_path(config.model)
    model = task.build_model(model_path=model_path, num_labels=len(splits.label_names),
                             lora=LoraSettings.from_config(config), seed=config.seed, profile=config.profile)
    arrays_to_adapter(model, Checkpoint.load(run).global_arrays)
    dataset = task.encode(tokenizer=load_tokenizer(model_path), split=splits.test, max_length=config.max_length)
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=dataset.tensors[0], attention_mask=dataset.tensors[1]).logits.argmax(-1)
    names = [splits.label_names[i] for i in predicted.tolist()]
    truth = [splits.label_names[i] for i in splits.test.labels]
    return list(splits.test.texts), names, sum(p == t for p, t in zip(names, truth)) / len(truth)


@pytest.mark.slow
def test_a_fresh_process_loads_the_exported_adapter_by_its_folder_and_base_and_predicts_like_the_run(
        tiny_config, tmp_path):
    config = tiny_config()
    out = tmp_path / "run"
    # The real CLI and apps (SecAgg+, DP, signed ledgers, export) in this process: the loading is the subject.
    result = fedtune("simulate", "--engine", "in-process", "--out", str(out), *set_args(
        model=config.model, data=config.data, num_clients=2, clients_per_round=2, num_rounds=2, batch_size=16,
        max_length=config.max_length, learning_rate=0.05, head_learning_rate=0.1, local_epochs=3,
        lora_variant="lora", lora_rank=4, target_epsilon=50.0, training_mode="adapter",
        base_dtype="float32"))  # bf16 differs across processes at near ties (README), even at one batch shape
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    adapter, summary = out / "adapter", json.loads((out / "summary.json").read_text())

    texts, expected, accuracy = _run_evaluation_predictions(out)
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-12)  # it is the run's own evaluation
    assert len(set(expected)) >= 2  # a comparison a constant predictor could not pass by label order alone
    fresh = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(adapter), config.model],
                           input=json.dumps(texts), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == expected

    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == config.model  # the user's path, as given
    assert not any(".venv" in p.read_text(errors="replace") for p in adapter.iterdir())
    assert BaseModelReference.read(adapter).mismatches(Path(config.model)) == []
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "More Information Needed" not in card
    for name in ("markets", "politics", "sport"):
        assert f"| {name} |" in card
    assert f"largest epsilon any client spent: {max(summary['epsilon'].values()):.4g}" in card
    assert "q (sample rate)" not in card and not any(f"| {cid} |" in card for cid in summary["epsilon"])
    for fact in ("delta: 1e-05", "clipping bound C (max-grad-norm): 1", "accountant: prv", "sigma",
                 f"test_accuracy: {summary['test_accuracy']:.4f}", "secure aggregation: on"):
        assert fact in card, fact
    audit = audit_run(target=out).to_json()  # every exported file is one the server signed
    assert audit["exit_code"] == 0 and not [p for p in audit["problems"] if "adapter/" in p], audit
