"""Instruction fine-tuning of a causal LM: masking, per-example loss, DP learning, the whole
federation, and the errors a user meets. A tiny Llama (2 layers) with SmolLM2's tokenizer and
chat template is loaded through the same from_pretrained path as any model folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from client.trainer import train_locally
from common.models.causal_lm import causal_lm_loss, response_nll
from common.tasks.causal_lm import evaluate_causal_lm
from common.models.causal_lm import IGNORE
from common.tasks.chat_tokens import encode_pairs, keep_fitting, pair_ids, prompt_ids
from common.errors import FedtuneError
from common.data.instructions import InstructionSplit, load_instruction_pairs
from common.models.adapter import adapter_to_arrays
from common.models.loading import load_tokenizer
from common.models.lora import LoraSettings
from common.tasks import build_lora_model
from common.privacy.accounting import epsilon_of
from common.privacy.plan import plan_privacy
from common.run_data import federated_splits
from common.tasks import get_task
from tests.conftest import write_csv, write_jsonl
from tests.helpers import ROOT, read_metrics, run_fedtune, set_args
from tests.test_privacy_accounting import independent_epsilon


def _model(config):
    from pathlib import Path

    return build_lora_model(task="causal-lm", model_path=Path(config.model), num_labels=0,
                            lora=LoraSettings.from_config(config), seed=config.seed)


def _split(pairs: list[tuple[str, str]]) -> InstructionSplit:
    return InstructionSplit(prompts=[p for p, _ in pairs], responses=[r for _, r in pairs], labels=[0] * len(pairs))


def test_prompt_tokens_are_masked_and_only_the_response_is_learned(tiny_causal_lm_dir):
    tokenizer = load_tokenizer(tiny_causal_lm_dir)
    pairs = [("What is AI?", "A field of computer science."), ("Hi", "Hello! How can I help you today, friend?")]
    ids, mask, labels = encode_pairs(tokenizer=tokenizer, split=_split(pairs), max_length=64).tensors
    for row, (prompt, response) in enumerate(pairs):
        head, tail = pair_ids(tokenizer, prompt, response)
        n = len(head) + len(tail)
        assert ids[row, :n].tolist() == head + tail
        assert (labels[row, :len(head)] == IGNORE).all(), "a prompt token would be trained"
        assert labels[row, len(head):n].tolist() == tail
        assert (labels[row, n:] == IGNORE).all() and (mask[row, n:] == 0).all() and (mask[row, :n] == 1).all()
        # The chat template wraps the prompt; the trained part is the reply and its end-of-turn.
        assert "<|im_start|>user" in tokenizer.decode(head) and prompt in tokenizer.decode(head)
        assert tokenizer.decode(tail) == response + "<|im_end|>"  # not the newline the template prints after it


def test_loss_counts_response_tokens_only_and_each_example_alone(tiny_lm_config):
    """The loss equals a hand computation over response positions, and an example's term does
    not depend on its batch-mates (a batch-wide token mean would let one record scale the others)."""
    config = tiny_lm_config()
    model = _model(config)
    with torch.no_grad():  # LoRA B starts at zero, which would make every LoRA A gradient zero
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    tokenizer = load_tokenizer(config.model)
    pairs = [("Tell me a joke", "Why did the chicken cross the road?"), ("Bye", "Goodbye!")]
    ids, mask, labels = encode_pairs(tokenizer=tokenizer, split=_split(pairs), max_length=64).tensors
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        by_hand = []
        for row in range(2):
            targets = labels[row, 1:]
            keep = targets != IGNORE
            by_hand.append(torch.nn.functional.cross_entropy(logits[row, :-1][keep], targets[keep]))
        expected = torch.stack(by_hand).mean()
        assert causal_lm_loss(model, ids, mask, labels).item() == pytest.approx(expected.item(), rel=1e-5)
        alone, _ = response_nll(model, ids[:1], mask[:1], labels[:1])
        together, _ = response_nll(model, ids, mask, labels)
        assert alone[0].item() == pytest.approx(together[0].item(), rel=1e-5)

    # Opacus' per-sample gradient of example 0 in the batch equals its gradient computed alone.
    from opacus import GradSampleModule

    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    causal_lm_loss(wrapped, ids, mask, labels).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = [p.grad_sample[0].clone() for p in params]
    wrapped.cleanup()
    model.zero_grad()
    for p in params:
        p.grad_sample = None
    causal_lm_loss(model, ids[:1], mask[:1], labels[:1]).backward()
    assert all(p.grad.abs().max() > 0 for p in params), "every adapter tensor gets a gradient"
    for sample, p in zip(per_sample, params, strict=True):
        torch.testing.assert_close(sample, p.grad, rtol=1e-4, atol=1e-7)


def test_truncation_keeps_part_of_every_response_and_drops_prompts_that_fill_max_length(tiny_causal_lm_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_causal_lm_dir)
    long_response = " ".join(["word"] * 200)
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short question", "response": long_response},
        {"prompt": "another short one", "response": "fine"},
        {"prompt": " ".join(["very"] * 80) + " long prompt", "response": "lost"},
    ])
    pairs = load_instruction_pairs(data=str(data))
    kept = keep_fitting(pairs, tokenizer=tokenizer, max_length=48)
    assert kept.prompts == ["short question", "another short one"]
    assert "1 with a prompt longer than max-length dropped" in kept.source
    ids, mask, labels = encode_pairs(tokenizer=tokenizer, split=kept.take([0, 1]), max_length=48).tensors
    assert ids.shape[1] == 48 and int(mask[0].sum()) == 48  # the long response was cut to fit
    assert (labels[0] != IGNORE).sum() >= 1
    with pytest.raises(FedtuneError, match="every prompt is at least max-length=8 tokens"):
        keep_fitting(pairs, tokenizer=tokenizer, max_length=8)


def test_user_files_prompt_response_alpaca_and_missing_columns(tmp_path):
    alpaca = write_csv(tmp_path / "a.csv", [("Translate", "bonjour", "hello"), ("Say hi", "", "hi")],
                       header=("instruction", "input", "output"))
    pairs = load_instruction_pairs(data=str(alpaca))
    assert pairs.prompts == ["Translate\n\nbonjour", "Say hi"] and pairs.responses == ["hello", "hi"]
    custom = write_jsonl(tmp_path / "c.jsonl", [{"q": "a?", "a": "b."}])
    assert load_instruction_pairs(data=str(custom), prompt_column="q", response_column="a").responses == ["b."]
    wrong = write_csv(tmp_path / "w.csv", [("x", "y")], header=("question", "answer"))
    with pytest.raises(FedtuneError, match="neither 'prompt'/'response' columns .* columns found: question, answer"):
        load_instruction_pairs(data=str(wrong))


def test_chatterbot_category_partition_gives_each_client_whole_categories():
    from common.config import RunConfig

    config = RunConfig(task="causal-lm", data="chatterbot", partitioner="category", num_clients=3,
                       clients_per_round=3, model="default")
    splits = federated_splits(config)
    assert len(splits.label_names) == 21
    owners = [set(c.train.labels) | set(c.validation.labels) for c in splits.clients]
    assert all(owners) and not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    sizes = [len(c.train) for c in splits.clients]
    assert max(sizes) < 1.5 * min(sizes), sizes  # balanced as whole categories allow


def test_dp_training_lowers_held_out_loss_and_spends_the_planned_epsilon(tiny_lm_config):
    config = tiny_lm_config(learning_rate=0.05, lora_mlp=True)
    splits = federated_splits(config)
    tokenizer = load_tokenizer(config.model)
    train = encode_pairs(tokenizer=tokenizer, split=_merge([c.train for c in splits.clients]), max_length=64)
    test = encode_pairs(tokenizer=tokenizer, split=splits.test, max_length=64)
    model = _model(config)
    before_arrays = adapter_to_arrays(model)
    before = evaluate_causal_lm(model=model, dataset=test)["loss"]
    plan = plan_privacy(num_examples=len(train), batch_size=8, local_epochs=4, num_rounds=1, target_epsilon=8.0,
                        target_delta=1e-5)
    result = train_locally(model=model, dataset=train, loss=get_task("causal-lm").loss, learning_rate=0.05, batch_size=8, local_epochs=4,
                           max_grad_norm=1.0, plan=plan, history=[], seed=0)
    after = evaluate_causal_lm(model=model, dataset=test)["loss"]
    lora_b = [a for (name, _), a in zip(_named(model), adapter_to_arrays(model)) if "lora_B" in name]
    assert all(np.abs(b).max() > 0 for b in lora_b), "every LoRA B moved away from zero"
    assert not all(np.array_equal(x, y) for x, y in zip(before_arrays, adapter_to_arrays(model)))
    assert after < before - 0.2, (before, after)
    spent = epsilon_of(result.history, delta=1e-5, accountant="prv")
    assert spent <= 8.0 + 1e-6
    assert spent == pytest.approx(independent_epsilon(sigma=plan.noise_multiplier, rate=plan.sample_rate,
                                                      steps=plan.steps_per_round, delta=1e-5), rel=0.02)


def _merge(parts: list[InstructionSplit]) -> InstructionSplit:
    return InstructionSplit(prompts=sum((p.prompts for p in parts), []), responses=sum((p.responses for p in parts), []),
                            labels=sum((p.labels for p in parts), []))


def _named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.slow
def test_federation_lowers_perplexity_and_the_adapter_generates_in_a_fresh_process(tiny_lm_config, tmp_path):
    config = tiny_lm_config(num_rounds=3, learning_rate=0.05, lora_mlp=True, local_epochs=2)
    out = tmp_path / "run"
    result = run_fedtune("simulate", "--out", str(out), *set_args(**{
        k.replace("-", "_"): v for k, v in config.to_flower().items() if v != ""}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "perplexity" in result.stdout
    rounds = read_metrics(out)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["update_applied"] and r["aggregation"] == "secagg+" for r in rounds)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_perplexity"] == pytest.approx(rounds[-1]["test_perplexity"])
    assert summary["test_perplexity"] < summary["base_perplexity"]
    assert summary["test_perplexity"] == pytest.approx(np.exp(summary["test_loss"]), rel=1e-6)
    assert all(e <= 8.0 + 1e-6 for e in summary["epsilon"].values()) and len(summary["epsilon"]) == 3
    samples = (out / "samples.md").read_text()
    assert samples.count("**base model:**") == 2 and "fine-tuned (after round 3)" in samples
    audit = run_fedtune("audit", str(out))
    assert audit.returncode == 0, audit.stdout + audit.stderr

    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(out / 'adapter')!r})
        base = AutoModelForCausalLM.from_pretrained({config.model!r})
        model = PeftModel.from_pretrained(base, {str(out / 'adapter')!r})
        prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "What is the weather like in Oslo?"}}],
                                               tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        print("NEW", out.shape[1] - ids["input_ids"].shape[1])
        print("LORA", sum(p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n) > 0)
    """)
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert "NEW 6" in loaded.stdout and "LORA True" in loaded.stdout


def test_lora_on_the_lm_head_is_refused(tiny_lm_config):
    """The head runs per example on 2-D input; Opacus would read its tokens as examples."""
    with pytest.raises(FedtuneError, match="reach the LM head"):
        _model(tiny_lm_config(lora_target_modules="q_proj,lm_head"))


@pytest.mark.parametrize("case", ["no-prompt-column", "prompt-too-long", "not-a-causal-lm"])
def test_bad_input_gets_a_clear_error(case, tiny_lm_config, tiny_model_dir, tmp_path):
    config = tiny_lm_config()
    keys = {"task": "causal-lm", "model": config.model, "data": config.data, "num_clients": 2,
            "clients_per_round": 2, "partitioner": "iid"}
    expected = {
        "no-prompt-column": "has neither 'prompt'/'response' columns",
        "prompt-too-long": "every prompt is at least max-length=20 tokens",
        "not-a-causal-lm": "not a causal language model",
    }[case]
    if case == "no-prompt-column":
        keys["data"] = str(write_csv(tmp_path / "t.csv", [("a text", "a label")] * 3))
    elif case == "prompt-too-long":
        keys["max_length"] = 20
    else:
        keys["model"] = str(tiny_model_dir)  # a BERT encoder
    result = run_fedtune("simulate", "--out", str(tmp_path / "run"), *set_args(**keys), timeout=120)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("dp", [True, False])
def test_a_batch_done_in_pieces_gives_the_same_update(tiny_lm_config, dp):
    """physical-batch-size bounds memory only: clipping is per example, so summing the clipped
    gradients of pieces is the same step (noise off and sample rate 1 make the batches equal)."""
    from common.privacy.plan import PrivacyPlan

    config = tiny_lm_config()
    tokenizer = load_tokenizer(config.model)
    train = encode_pairs(tokenizer=tokenizer, split=federated_splits(config).clients[0].train, max_length=64)
    plan = PrivacyPlan(num_examples=len(train), sample_rate=1.0, steps_per_round=2, noise_multiplier=0.0,
                       planned_rounds=1, target_epsilon=1e9, target_delta=1e-5, accountant="rdp") if dp else None
    results = []
    for physical in (0, 3):
        model = _model(config)
        train_locally(model=model, dataset=train, loss=get_task("causal-lm").loss, learning_rate=0.01, batch_size=len(train), local_epochs=2,
                      max_grad_norm=0.05, plan=plan, history=[], seed=0, physical_batch_size=physical)
        results.append(adapter_to_arrays(model))
    assert not all(np.array_equal(a, b) for a, b in zip(results[0], adapter_to_arrays(_model(config))))
    for whole, pieces in zip(*results, strict=True):
        np.testing.assert_allclose(whole, pieces, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_default_model_is_converted_once_from_gguf_to_a_trainable_fp32_folder(tmp_path, monkeypatch, capsys):
    """The packaged Q4_1 GGUF becomes a plain folder whose model computes exactly what the
    dequantized GGUF model computes, trains (no quantized flag) and is reused afterwards."""
    from transformers import AutoModelForCausalLM

    from common.tasks import resolve_model_path
    from common.models.smollm2 import gguf_path

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    folder = resolve_model_path("default", task="causal-lm")
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().out
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name], "no staging folder left behind"
    converted = AutoModelForCausalLM.from_pretrained(str(folder))
    assert getattr(converted, "hf_quantizer", None) is None and converted.dtype == torch.float32
    gguf = gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = torch.tensor([prompt_ids(tokenizer, "What is AI?")])
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert resolve_model_path("default", task="causal-lm") == folder
    assert "converting" not in capsys.readouterr().out, "the second use reconverted"



def test_a_deployed_node_reads_its_own_prompt_response_file(tiny_lm_config, tmp_path):
    """In a deployment the node config names the file and its columns; no labels to reconcile."""
    from client.node_data import NodeData, client_split

    rows = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(20)]
    path = write_jsonl(tmp_path / "site.jsonl", rows)
    node = NodeData.from_node_config({"data": str(path), "client-id": "clinic-a", "prompt-column": "question",
                                      "response-column": "answer", "ledger-dir": str(tmp_path / "ledger"),
                                      "model": tiny_lm_config().model, "validation-fraction": 0.2})
    split = client_split(tiny_lm_config(), node, ())  # the node's validation share, not the job's
    assert (len(split.train), len(split.validation)) == (16, 4)
    assert sorted(split.train.prompts + split.validation.prompts) == sorted(r["question"] for r in rows)
    pairs = dict(zip(split.train.prompts, split.train.responses))
    assert all(pairs[f"Question {i}?"] == f"Answer {i}." for i in range(20) if f"Question {i}?" in pairs)
