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

from fedtune.client.trainer import train_locally
from fedtune.common.models.causal_lm import causal_lm_loss, response_nll
from fedtune.common.tasks.causal_lm import evaluate_causal_lm
from fedtune.common.models.causal_lm import IGNORE
from fedtune.common.tasks.chat_tokens import encode_pairs, keep_fitting, pair_ids, prompt_ids
from fedtune.common.errors import FedtuneError
from fedtune.common.data.instructions import InstructionSplit, load_instruction_pairs
from fedtune.common.models.adapter import adapter_to_arrays
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings
from fedtune.common.tasks import build_lora_model
from fedtune.common.privacy.accounting import epsilon_of
from fedtune.common.privacy.plan import plan_privacy
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks import get_task
from tests.conftest import write_csv, write_jsonl
from tests.helpers import ROOT, fedtune, read_metrics, set_args
from tests.test_privacy_accounting import independent_epsilon



def _model(config):
    from pathlib import Path

    return build_lora_model(task="causal-lm", model_path=Path(config.model), num_labels=0,
                            lora=LoraSettings.from_config(config), seed=config.seed, profile=config.profile)


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
    not depend on its batch-mates (a batch-wide token mean would let one record scale the others).
    In fp32: a bf16 base rounds a batch's matmuls differently from one example's."""
    config = tiny_lm_config(base_dtype="float32")
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


def test_chatterbot_category_partition_gives_each_client_whole_categories(tiny_causal_lm_dir):
    from fedtune.common.config import RunConfig

    # The tiny Llama carries SmolLM2's own tokenizer, which is all the split reads of the model (to
    # drop prompts longer than max-length): the same pairs as model "default", without converting it.
    config = RunConfig(task="causal-lm", data="chatterbot", partitioner="category", num_clients=3,
                       clients_per_round=3, model=str(tiny_causal_lm_dir))
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
    # The same ServerApp and ClientApps as on Ray (SecAgg+, DP, ledgers, export), nodes run in turn here.
    result = fedtune("simulate", "--engine", "in-process", "--out", str(out), *set_args(**{
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
    audit = fedtune("audit", str(out))
    assert audit.returncode == 0, audit.stdout + audit.stderr

    # A user's new interpreter: only the adapter folder and the base model folder.
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
    result = fedtune("simulate", "--engine", "in-process", "--out", str(tmp_path / "run"), *set_args(**keys))
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("dp", [True, False])
def test_a_batch_done_in_pieces_gives_the_same_update(tiny_lm_config, dp):
    """physical-batch-size bounds memory only: clipping is per example, so summing the clipped
    gradients of pieces is the same step (noise off and sample rate 1 make the batches equal).
    In fp32, where the identity is exact (a bf16 base rounds a piece's matmuls differently)."""
    from fedtune.common.privacy.plan import PrivacyPlan

    config = tiny_lm_config(base_dtype="float32")
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


def _mini_smollm2_gguf(path, tokenizer_dir, *, vocab=1024, hidden=64, layers=2, heads=2, kv_heads=1, ffn=128):
    """A miniature of the packaged SmolLM2 GGUF, written with the `gguf` package: the same llama keys
    and tensor names, the same quantizations (a Q8_0 embedding, Q4_1 projections, F32 norms), a tied
    output, its control tokens and chat template, and the first `vocab` tokens of SmolLM2's own
    tokenizer (read from the packaged file by the tiny Llama fixture) with the merges among them.
    Random weights for 2 layers, 64 wide: the conversion is the subject, not the size of the model
    (the packaged 135M file takes a minute to convert and another to load as a reference)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])[:vocab]
    assert [i for _, i in by_id] == list(range(vocab))
    tokens = [token for token, _ in by_id]
    kept = set(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    merges = [m for m in merges if m.replace(" ", "") in kept and all(part in kept for part in m.split(" "))]
    control = {t["id"] for t in spec["added_tokens"] if t["special"]}
    template = (tokenizer_dir / "chat_template.jinja").read_text()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("mini SmolLM2")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in control else 1 for i in range(vocab)])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rng = np.random.default_rng(0)

    def weight(name, rows, cols, kind):
        array = rng.normal(0, 0.2, (rows, cols)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)

    def norm(name):
        writer.add_tensor(name, (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))

    kv = kv_heads * hidden // heads
    weight("token_embd.weight", vocab, hidden, Q.Q8_0)
    for block in range(layers):
        norm(f"blk.{block}.attn_norm.weight")
        weight(f"blk.{block}.ffn_down.weight", hidden, ffn, Q.Q4_1)
        weight(f"blk.{block}.ffn_gate.weight", ffn, hidden, Q.Q4_1)
        weight(f"blk.{block}.ffn_up.weight", ffn, hidden, Q.Q4_1)
        norm(f"blk.{block}.ffn_norm.weight")
        weight(f"blk.{block}.attn_k.weight", kv, hidden, Q.Q4_1)
        weight(f"blk.{block}.attn_output.weight", hidden, hidden, Q.Q4_1)
        weight(f"blk.{block}.attn_q.weight", hidden, hidden, Q.Q4_1)
        weight(f"blk.{block}.attn_v.weight", kv, hidden, Q.Q4_1)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_default_model_is_converted_once_from_gguf_to_a_trainable_fp32_folder(tiny_causal_lm_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """The packaged Q4_1 GGUF (here its miniature: same keys, quantizations and tokenizer) becomes a
    plain folder whose model computes exactly what the dequantized GGUF model computes, trains (no
    quantized flag) and is reused afterwards."""
    from transformers import AutoModelForCausalLM

    from fedtune.common.models import smollm2
    from fedtune.common.tasks import resolve_model_path

    packaged = tmp_path / "package" / smollm2.GGUF_FILE
    packaged.parent.mkdir()
    _mini_smollm2_gguf(packaged, tiny_causal_lm_dir)
    monkeypatch.setattr(smollm2, "gguf_path", lambda: packaged)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDTUNE_CACHE", str(cache))
    folder = resolve_model_path("default", task="causal-lm")
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().out
    assert folder.parent == cache and (folder / "model.safetensors").is_file()
    assert [p.name for p in cache.iterdir()] == [folder.name], "no staging folder left behind"
    converted = AutoModelForCausalLM.from_pretrained(str(folder))
    assert getattr(converted, "hf_quantizer", None) is None and converted.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(str(packaged.parent), gguf_file=packaged.name,
                                                     dtype=torch.float32)
    assert reference.hf_quantizer is not None  # what the conversion is for: this one refuses training
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = torch.tensor([prompt_ids(tokenizer, "What is AI?")])
    assert ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")  # a control token, whole
    with torch.no_grad():
        logits = converted(input_ids=ids).logits
        assert logits.std() > 0.1  # random weights: a model that computes something to compare
        torch.testing.assert_close(logits, reference(input_ids=ids).logits)
    assert resolve_model_path("default", task="causal-lm") == folder
    assert "converting" not in capsys.readouterr().out, "the second use reconverted"


def test_a_deployed_node_reads_its_own_prompt_response_file(tiny_lm_config, tmp_path):
    """In a deployment the node config names the file and its columns; no labels to reconcile."""
    from fedtune.client.node_data import NodeData, client_split

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
