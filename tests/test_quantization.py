"""Quantized bases (QLoRA): a 4-bit tiny Llama trains under DP-SGD and learns; its per-sample
gradients are the unquantized model's on the same weights; activation checkpointing changes
nothing Opacus computes; an nf4 node and an fp32 node federate as two fp32 nodes would; an nf4
run's adapter loads into the fp32 base the standard PEFT way. bitsandbytes' 4-bit layers run on
this CPU, so all of it runs in CI, not only on a GPU.

"Same weights": the fixture below saves, as an ordinary fp32 folder, the tiny Llama whose linear
weights are what NF4 stores (quantize, dequantize, save). Quantizing that folder again gives back
the same weights (within 4e-5: double quantization rounds the block scales), so an nf4 load and
an fp32 load of it differ only in how they compute, which is what these tests compare."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from safetensors.numpy import load_file

import fedtune.client.trainer as client_trainer
from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.client.trainer import train_locally
from fedtune.common.config import RunConfig
from fedtune.common.data.instructions import InstructionSplit
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile
from fedtune.common.models import host
from fedtune.common.models.adapter import arrays_to_adapter, trainable_named_parameters
from fedtune.common.models.causal_lm import build_lora_causal_lm, causal_lm_loss
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings
from fedtune.common.privacy.plan import plan_privacy
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks.causal_lm import evaluate_causal_lm
from fedtune.common.tasks.chat_tokens import encode_pairs
from fedtune.simulations import inprocess
from tests.helpers import ROOT

FP32 = ExecutionProfile(device="cpu", base_dtype="float32")
NF4 = ExecutionProfile(device="cpu", base_dtype="float32", quantization="nf4")  # computes in fp32: comparable
LORA = LoraSettings(rank=4, alpha=8, variant="lora", mlp=True)  # down_proj: the last module of a layer


@pytest.fixture(scope="module")
def nf4_exact_dir(tiny_causal_lm_dir, tmp_path_factory) -> Path:
    """The tiny Llama with every linear weight replaced by its NF4 value, saved in fp32."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-nf4-exact")
    quantized = AutoModelForCausalLM.from_pretrained(str(tiny_causal_lm_dir), **NF4.pretrained_kwargs())
    full = AutoModelForCausalLM.from_pretrained(str(tiny_causal_lm_dir), dtype=torch.float32)
    weights = dict(full.named_parameters())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weights[f"{name}.weight"].copy_(bnb.functional.dequantize_4bit(module.weight.data,
                                                                               module.weight.quant_state))
    full.save_pretrained(str(folder))
    for file in tiny_causal_lm_dir.iterdir():
        if not (folder / file.name).exists():
            shutil.copy(file, folder / file.name)  # the tokenizer and its chat template
    return folder


def _batch(config: RunConfig, part: str = "train", count: int = 8):
    """The first `count` pairs of the test split, or of every client's training split."""
    splits = federated_splits(config)
    parts = [splits.test] if part == "test" else [client.train for client in splits.clients]
    prompts, responses = sum((p.prompts for p in parts), []), sum((p.responses for p in parts), [])
    pairs = InstructionSplit(prompts=prompts[:count], responses=responses[:count], labels=[0] * len(prompts[:count]))
    return encode_pairs(tokenizer=load_tokenizer(Path(config.model)), split=pairs, max_length=config.max_length)


def _per_sample_gradients(model, batch) -> torch.Tensor:
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    causal_lm_loss(wrapped, *batch.tensors).backward()
    grads = torch.cat([p.grad_sample.reshape(len(batch), -1) for _, p in trainable_named_parameters(model)], dim=1)
    wrapped.cleanup()
    return grads


def test_a_quantized_base_is_4_bit_and_everything_that_trains_is_fp32(tiny_causal_lm_dir):
    import bitsandbytes as bnb

    model = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0,
                                 profile=ExecutionProfile(device="cpu", quantization="nf4"))
    base_layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(base_layers) == 14 and all(m.weight.quant_type == "nf4" for m in base_layers)  # 2 layers x 7
    assert {p.dtype for _, p in trainable_named_parameters(model)} == {torch.float32}
    assert not any(p.requires_grad for m in base_layers for p in m.parameters(recurse=False))
    int8 = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0,
                                profile=ExecutionProfile(device="cpu", quantization="int8"))
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in int8.modules()) == 14


def test_per_sample_gradients_of_nf4_match_the_unquantized_model_on_the_same_weights(nf4_exact_dir, tiny_lm_config):
    """Same adapter values, nf4 against fp32 on the weights NF4 stores: each example's gradient
    (what DP-SGD clips) agrees within 1e-3 relative (measured: 7e-5; the weights differ by the
    double-quantized block scales). Checkpointing the layers changes no per-sample gradient at all."""
    config = tiny_lm_config(model=str(nf4_exact_dir))
    batch = _batch(config)
    grads = {}
    for name, profile in [("fp32", FP32), ("nf4", NF4),
                          ("nf4 checkpointed", ExecutionProfile(device="cpu", base_dtype="float32",
                                                                quantization="nf4", activation_checkpointing=True))]:
        model = build_lora_causal_lm(model_path=nf4_exact_dir, lora=LORA, seed=0, profile=profile)
        generator = torch.Generator().manual_seed(0)
        arrays_to_adapter(model, [torch.randn(p.shape, generator=generator).numpy() * 0.1
                                  for _, p in trainable_named_parameters(model)])
        grads[name] = _per_sample_gradients(model, batch)
    relative = (grads["nf4"] - grads["fp32"]).norm(dim=1) / grads["fp32"].norm(dim=1)
    assert relative.max() < 1e-3, relative
    assert torch.equal(grads["nf4 checkpointed"], grads["nf4"])


def test_checkpointing_recomputes_each_layer_once_and_opacus_records_it_once(tiny_causal_lm_dir, tiny_lm_config):
    """The layers really are recomputed (two forwards per training step), and Opacus keeps no
    leftover activations (a double record would leave one per LoRA module after backward)."""
    profile = ExecutionProfile(device="cpu", base_dtype="float32", activation_checkpointing=True)
    model = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0, profile=profile)
    calls = []
    layer = model.get_base_model().model.layers[0]
    layer.mlp.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    causal_lm_loss(wrapped, *_batch(tiny_lm_config()).tensors).backward()
    assert len(calls) == 2
    assert all(not getattr(m, "activations", []) for m in model.modules())
    assert all(p.grad_sample is not None for _, p in trainable_named_parameters(model))
    wrapped.cleanup()


def test_an_nf4_base_trains_under_dp_and_learns(tiny_causal_lm_dir, tiny_lm_config):
    """QLoRA under DP-SGD, in bf16 compute as on a GPU: held-out loss falls over 24 steps (measured:
    11.41 to 10.65-10.72 over three noise draws)."""
    config = tiny_lm_config(learning_rate=0.05, lora_mlp=True)
    profile = ExecutionProfile(device="cpu", base_dtype="bfloat16", quantization="nf4")
    model = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LoraSettings(rank=4, alpha=8, mlp=True), seed=0,
                                 profile=profile)
    train, test = _batch(config, count=60), _batch(config, "test", count=60)
    before = evaluate_causal_lm(model=model, dataset=test)["loss"]
    plan = plan_privacy(num_examples=len(train), batch_size=8, local_epochs=4, num_rounds=1, target_epsilon=8.0,
                        target_delta=1e-5)
    train_locally(model=model, dataset=train, loss=causal_lm_loss, learning_rate=0.05, batch_size=8, local_epochs=4,
                  max_grad_norm=1.0, plan=plan, history=[], seed=0)
    after = evaluate_causal_lm(model=model, dataset=test)["loss"]
    assert after < before - 0.2, (before, after)


def test_quantization_is_refused_where_it_does_not_apply(tiny_config):
    with pytest.raises(FedtuneError, match="quantization.*causal-lm"):
        tiny_config(quantization="nf4").validate()
    with pytest.raises(FedtuneError, match="activation-checkpointing.*causal-lm"):
        tiny_config(activation_checkpointing=True).validate()
    with pytest.raises(FedtuneError, match="quantization must be one of none, nf4, int8"):
        ExecutionProfile(quantization="fp4")
    from fedtune.common.models.classifier import build_lora_classifier  # a node's own nf4 profile, a classification job
    with pytest.raises(FedtuneError, match="apply to task .causal-lm. only"):
        build_lora_classifier(model_path=Path(tiny_config().model), num_labels=3, lora=LORA, seed=0,
                              profile=ExecutionProfile(quantization="nf4"))


def _federate(config: RunConfig, run_dir: Path, monkeypatch, node_policy=None) -> dict:
    seeds = itertools.count()  # the same noise in both federations; OS entropy in the product
    monkeypatch.setattr(client_trainer, "private_generator",
                        lambda _seeds=seeds, **kw: torch.Generator(**kw).manual_seed(next(_seeds) % 2))
    host.forget_all()
    grid, directory = inprocess.federation(config, run_dir, node_policy=node_policy)
    return inprocess.run(grid, config, directory)


@pytest.mark.slow
def test_an_nf4_node_and_an_fp32_node_federate_as_two_fp32_nodes_and_the_adapter_loads_in_fp32(
        nf4_exact_dir, tiny_lm_config, tmp_path, monkeypatch):
    config = tiny_lm_config(model=str(nf4_exact_dir), num_clients=2, clients_per_round=2, num_rounds=2,
                            base_dtype="float32", learning_rate=0.05, samples=0)
    mixed = config.with_overrides(quantization="nf4")  # the coordinator and node 0 in nf4; node 1 overrides
    summaries = {"fp32": _federate(config, tmp_path / "fp32", monkeypatch),
                 "mixed": _federate(mixed, tmp_path / "mixed", monkeypatch, {1: {"quantization": "none"}})}
    assert summaries["mixed"]["epsilon"] == summaries["fp32"]["epsilon"]  # the profile never touches the plan
    adapters = {name: load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")) for name in summaries}
    for key, value in adapters["fp32"].items():
        assert np.abs(adapters["mixed"][key] - value).max() <= 1e-3 * max(np.abs(value).max(), 1e-3), key
    assert any(np.abs(v).max() > 0 for k, v in adapters["mixed"].items() if "lora_B" in k)  # it trained
    ledgers, run_id = tmp_path / "mixed" / "ledgers", json.loads((tmp_path / "mixed" / "run.json").read_text())["run_id"]
    profiles = [ClientPrivacyLedger(directory=ledgers / f"client-{i}", client_id=f"client-{i}")
                .record_for(run_id, 2)["profile"]["quantization"] for i in (0, 1)]
    assert profiles == ["nf4", "none"]
    card = (tmp_path / "mixed" / "adapter" / "README.md").read_text()
    assert "nf4" in card
    _adapter_loads_in_fp32_as_the_nf4_run_scored(nf4_exact_dir, tmp_path / "mixed" / "adapter", mixed)


def _adapter_loads_in_fp32_as_the_nf4_run_scored(base: Path, adapter: Path, config: RunConfig) -> None:
    """The exported adapter, in a new interpreter, the standard PEFT way on the fp32 base: the
    same next-token predictions as the nf4 model the run ended with, logits within 1e-3."""
    batch = _batch(config, "test", count=6)
    model = build_lora_causal_lm(model_path=base, lora=LoraSettings.from_config(config), seed=config.seed,
                                 profile=NF4)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: torch.tensor(v) for k, v in
                                      load_file(str(adapter / "adapter_model.safetensors")).items()})
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch.tensors[0], attention_mask=batch.tensors[1]).logits.float()
    np.save(adapter.parent / "ids.npy", batch.tensors[0].numpy())
    np.save(adapter.parent / "mask.npy", batch.tensors[1].numpy())
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
        ids, mask = (torch.from_numpy(np.load({str(adapter.parent)!r} + f"/{{n}}.npy")) for n in ("ids", "mask"))
        with torch.no_grad():
            np.save({str(adapter.parent)!r} + "/logits.npy", model(input_ids=ids, attention_mask=mask).logits.numpy())
    """)
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    logits = torch.from_numpy(np.load(adapter.parent / "logits.npy"))
    mask = batch.tensors[1].bool()
    assert torch.equal(logits.argmax(-1)[mask], expected.argmax(-1)[mask])
    assert (logits - expected)[mask].abs().max() < 1e-3
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_deployed_node_quantizes_only_when_its_own_node_config_says_so():
    """A coordinator cannot make a node load its base in 4 bits (or stop doing so): the keys are
    the node's, like its device; a job asking for them is not read on a deployed node."""
    from types import SimpleNamespace

    from fedtune.client.app import profile_of

    job = {"quantization": "nf4", "activation-checkpointing": "true"}
    assert profile_of(SimpleNamespace(node_config={"client-id": "a"}, run_config=job), None) == ExecutionProfile()
    own = profile_of(SimpleNamespace(node_config={"quantization": "nf4", "activation-checkpointing": "true"},
                                     run_config={"quantization": "none"}), None)
    assert own.quantization == "nf4" and own.activation_checkpointing


def test_int8_models_over_one_base_share_its_weights_and_stay_correct(tiny_causal_lm_dir, tiny_lm_config):
    """bitsandbytes moves an 8-bit layer's int8 weights into the layer at its first forward; a second
    model sharing that base must still compute with them (not quantize the int8 values again).
    And LLM.int8()'s outlier threshold is 0: no column of one example's batch is treated
    differently because of another example's activations."""
    profile = ExecutionProfile(device="cpu", base_dtype="float32", quantization="int8")
    assert profile.pretrained_kwargs()["quantization_config"].llm_int8_threshold == 0.0
    ids, mask, _ = _batch(tiny_lm_config()).tensors
    host.forget_all()
    client = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0, profile=profile, resident=True)
    coordinator = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0, profile=profile)
    full = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0, profile=FP32)
    with torch.no_grad():
        logits = [m.eval()(input_ids=ids, attention_mask=mask).logits for m in (client, coordinator, full)]
        later = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0, profile=profile)
        logits.append(later.eval()(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[3])
    assert (logits[0] - logits[2]).norm() < 0.1 * logits[2].norm()  # int8 rounding (0.034), not a rescale
    frozen = "base_model.model.model.layers.0.self_attn.q_proj.base_layer"
    assert dict(client.named_modules())[frozen].state.CB.data_ptr() == \
        dict(coordinator.named_modules())[frozen].state.CB.data_ptr()  # one copy of the weights


def test_a_step_that_fails_midway_leaves_nothing_for_the_next_step(tiny_causal_lm_dir, tiny_lm_config):
    """An error between a forward and its backward (out of memory in a checkpointed layer's
    recomputation, say) must not leave Opacus' recorded inputs on the resident model: the next
    step's per-sample gradients would be scaled and padded with them."""
    config = tiny_lm_config()
    train = _batch(config, count=16)
    plan = plan_privacy(num_examples=len(train), batch_size=8, local_epochs=1, num_rounds=1, target_epsilon=8.0,
                        target_delta=1e-5)
    model = build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0, profile=FP32)

    def failing(net, *batch):
        causal_lm_loss(net, *batch)  # the forward records every LoRA module's input...
        raise MemoryError("out of memory")  # ...and the backward never comes

    with pytest.raises(MemoryError):
        train_locally(model=model, dataset=train, loss=failing, learning_rate=0.05, batch_size=8, local_epochs=1,
                      max_grad_norm=1.0, plan=plan, history=[], seed=0)
    assert not any({"activations", "max_batch_len"} & set(vars(m)) for m in model.modules())
    batch = _batch(config)
    assert torch.equal(_per_sample_gradients(model, batch), _per_sample_gradients(
        build_lora_causal_lm(model_path=tiny_causal_lm_dir, lora=LORA, seed=0, profile=FP32), batch))
