"""`make gpu-check`: every device and precision path of the execution profile, on one GPU, in under 8 minutes.

One table, one line per check; each names a path the CPU tests cover on the CPU and checks it where
it can break on a GPU:
- the base in bf16 on the device with fp32 trainables, LoRA A identical to an fp32 build, a DP step
  with the sampler's generator on the CPU and the noise's on the device, the empty-batch gradient,
  pooled features computed on the device and cached as fp32 on the CPU, a causal-LM DP step on a
  bf16 base, and seeded builds that leave the CUDA RNG as they found it;
- per-sample gradients of a tiny causal LM in fp32 (TF32 off): the device's equal the CPU's
  (1e-4 relative) and a micro-batch reference, each example's gradient alone (1e-4);
- per-sample gradients on an nf4 base (bitsandbytes, bf16 compute): activation checkpointing on
  equals off, bit for bit, and the micro-batch reference within bf16's precision (5e-2);
- a 2-client DP + SecAgg+ causal-LM federation (in-process engine, 1 round) with a bf16 base, and
  one with an nf4 base: both clients trained on the device in that precision (their signed
  ledgers say so), and the run's audit is consistent (exit 0);
- one DP-SGD step (batch 8 x 256 tokens) of a random 1.07B Llama in fp32, bf16 and nf4: step time
  and peak GPU memory (CUDA only);
- the torch build used, and the pip line that installs the pinned torch for that CUDA.

Time on one H100: estimated, not yet measured, about 3 minutes. Most of it is the random 1B
Llama: built once into the fedtune cache (about a minute: SmolLM2's tokenizer read from its GGUF
file, 1.07B weights drawn and saved), then loaded three times (fp32, bf16, nf4: each a few
seconds to read and place, nf4 quantized as it loads); its six steps take seconds. The tiny
random Llama is built once (about 8 s), each in-process federation takes about 7 s (5 of them
Flower's node-registration thread), the other lines a few seconds. On a 2-core CPU,
`--device cpu` runs every line but the 1B one in 20 to 40 s (tests/test_gpu_check.py).

    python -m benchmarks.gpu_check [--device cuda]   # exit 0: every line ok or skipped; 1: a line failed; 2: no GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import TensorDataset

CHECKS: list[tuple[str, Callable[[str, Path], str]]] = []
FP32_TOLERANCE = 1e-4  # fp32, TF32 off: the device against the CPU, Opacus against each example alone
BF16_TOLERANCE = 5e-2  # a bf16 computation against itself in other shapes (8 bits of mantissa)


class Skipped(Exception):
    """A line that does not apply on this device (its reason is the line's text)."""


def check(name: str):
    def register(function: Callable[[str, Path], str]):
        CHECKS.append((name, function))
        return function
    return register


def _classifier(device: str, folder: Path, *, dtype: str = "bfloat16", mode: str = "probe"):
    from fedtune.common.execution import ExecutionProfile
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.models.pooled_classifier import HeadSettings
    from fedtune.common.tasks import get_task

    return get_task("classification").build_model(
        model_path=folder, num_labels=3, lora=LoraSettings(rank=4, alpha=8, variant="ffa"), seed=0,
        head=HeadSettings(mode=mode), profile=ExecutionProfile(device=device, base_dtype=dtype))


def _records(n: int = 24) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, 16), generator=generator)
    return TensorDataset(ids, torch.ones_like(ids), torch.arange(n) % 3)


@check("base in bf16 on the device, trainables fp32 there, FFA's A equal to an fp32 build's")
def base_and_trainables(device: str, folder: Path) -> str:
    from fedtune.common.execution import base_dtype_name, check_trainables_fp32, device_of
    from fedtune.common.models.lora import lora_a_sha256

    model = _classifier(device, folder, mode="two-stage")
    check_trainables_fp32(model)
    assert base_dtype_name(model) == "bfloat16" and device_of(model).type == torch.device(device).type
    assert lora_a_sha256(model) == lora_a_sha256(_classifier(device, folder, dtype="float32", mode="two-stage"))
    return f"{device_of(model)}, base {base_dtype_name(model)}"


@check("a DP step: sampler generator on the CPU, noise generator on the device, an empty batch noised")
def dp_step(device: str, folder: Path) -> str:
    import fedtune.client.trainer as client_trainer
    from fedtune.client.trainer import train_locally
    from fedtune.common.privacy.noise import private_generator
    from fedtune.common.privacy.plan import PrivacyPlan
    from fedtune.common.tasks import get_task

    made: list[str] = []

    def recording(**kwargs):
        generator = private_generator(**kwargs)
        made.append(str(generator.device))
        return generator

    original, client_trainer.private_generator = client_trainer.private_generator, recording
    try:
        model, data = _classifier(device, folder, mode="two-stage"), _records()
        plan = PrivacyPlan(num_examples=len(data), sample_rate=0.02, steps_per_round=50, noise_multiplier=1.0,
                           planned_rounds=1, target_epsilon=1e9, target_delta=1e-5, accountant="rdp")
        result = train_locally(model=model, dataset=data, loss=get_task("classification").loss, learning_rate=0.1,
                               batch_size=1, local_epochs=1, max_grad_norm=1.0, plan=plan, history=[], seed=0)
    finally:
        client_trainer.private_generator = original
    assert made[0] == "cpu" and made[1].split(":")[0] == torch.device(device).type, made
    assert result.steps == 50  # 1/q steps; at q = 0.02 over 24 records most Poisson batches are empty
    return f"generators {made}, {result.steps} steps"


@check("pooled features computed on the device, cached on disk as fp32 on the CPU, read back")
def features(device: str, folder: Path) -> str:
    from fedtune.common.models import pooled_features

    model, data = _classifier(device, folder), _records()
    computed = pooled_features.cached_pooled_features(model=model, dataset=data, cache_dir=folder / "features")
    pooled_features.clear_memory()
    again = pooled_features.cached_pooled_features(model=model, dataset=data, cache_dir=folder / "features")
    vectors = computed.tensors[0]
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu" and torch.equal(vectors, again.tensors[0])
    return f"{tuple(vectors.shape)} float32, one file"


def _tiny_llama(folder: Path) -> Path:
    """A 2-layer, 32-wide Llama with a 256-token vocabulary (no tokenizer), saved once per run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.common.execution import seeded_rng

    llama = folder.parent / "tiny-llama"
    if not llama.exists():
        config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        with seeded_rng(0):
            LlamaForCausalLM(config).save_pretrained(str(llama))
    return llama


@check("a causal LM on a bf16 base: a DP step and the held-out loss on the device, the loss in fp32")
def causal_lm(device: str, folder: Path) -> str:
    from fedtune.client.trainer import train_locally
    from fedtune.common.execution import ExecutionProfile
    from fedtune.common.models.causal_lm import build_lora_causal_lm, causal_lm_loss
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.privacy.plan import PrivacyPlan
    from fedtune.common.tasks.causal_lm import evaluate_causal_lm

    model = build_lora_causal_lm(model_path=_tiny_llama(folder), lora=LoraSettings(rank=4, alpha=8), seed=0,
                                 profile=ExecutionProfile(device=device, base_dtype="bfloat16"))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(ids, torch.ones_like(ids), ids.clone())
    plan = PrivacyPlan(num_examples=4, sample_rate=1.0, steps_per_round=1, noise_multiplier=1.0, planned_rounds=1,
                       target_epsilon=1e9, target_delta=1e-5, accountant="rdp")
    train_locally(model=model, dataset=data, loss=causal_lm_loss, learning_rate=1e-3, batch_size=4,
                  local_epochs=1, max_grad_norm=1.0, plan=plan, history=[], seed=0, physical_batch_size=2)
    assert causal_lm_loss(model, *data.tensors).dtype == torch.float32
    loss = evaluate_causal_lm(model=model, dataset=data)["loss"]
    assert loss == loss and loss > 0  # finite, not NaN
    return f"one step in pieces of 2, held-out loss {loss:.3f}"


@check("a seeded build leaves the CPU and CUDA RNGs as it found them")
def rng_restored(device: str, folder: Path) -> str:
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    _classifier(device, folder)
    assert torch.equal(cpu, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(cuda, torch.cuda.get_rng_state_all() if cuda else []))
    return f"CPU and {len(cuda)} CUDA generator(s) unchanged"


# -- per-sample gradients: the device against the CPU and against each example alone -----------

LORA_MLP = dict(rank=4, alpha=8, variant="lora", mlp=True)  # down_proj: the last module of a decoder layer


def _tiny_lm(device: str, folder: Path, *, dtype: str, quantization: str = "none", checkpointing: bool = False):
    """The tiny Llama with LoRA on attention and MLP, built by the profile, its adapter set to seeded
    values: LoRA B starts at zero, which would make every gradient of A zero."""
    from fedtune.common.execution import ExecutionProfile
    from fedtune.common.models.adapter import trainable_named_parameters
    from fedtune.common.models.causal_lm import build_lora_causal_lm
    from fedtune.common.models.lora import LoraSettings

    profile = ExecutionProfile(device=device, base_dtype=dtype, quantization=quantization,
                               activation_checkpointing=checkpointing)
    model = build_lora_causal_lm(model_path=_tiny_llama(folder), lora=LoraSettings(**LORA_MLP), seed=0,
                                 profile=profile)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in trainable_named_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)  # the same on every device
    return model.train()


def _lm_batch(device: str) -> list[torch.Tensor]:
    """4 right-padded examples of 16 tokens (lengths 16, 12, 9, 14), the first 3 of each a prompt."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(16) < torch.tensor([16, 12, 9, 14])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # causal_lm's IGNORE: prompt and padding are not learned
    return [t.to(device) for t in (ids, mask, labels)]


def _per_sample_grads(model, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients of causal_lm_loss, wrapped as the trainer wraps (mean reduction)."""
    from opacus import GradSampleModule

    from fedtune.common.models.adapter import trainable_named_parameters
    from fedtune.common.models.causal_lm import causal_lm_loss

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        causal_lm_loss(wrapped, *batch).backward()
        return {name: p.grad_sample.detach().float().cpu().clone() for name, p in trainable_named_parameters(model)}
    finally:
        wrapped.cleanup()
        model.zero_grad(set_to_none=True)


def _microbatch_grads(model, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each example's gradient alone: a batch of one, plain autograd. causal_lm_loss is the mean of
    the examples' losses, so a batch of one's gradient is that example's, which is what Opacus'
    "mean" reduction scales each per-sample gradient back to (it multiplies by the batch size)."""
    from fedtune.common.models.adapter import trainable_named_parameters
    from fedtune.common.models.causal_lm import causal_lm_loss

    rows: dict[str, list[torch.Tensor]] = {name: [] for name, _ in trainable_named_parameters(model)}
    for i in range(len(batch[0])):
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, *(t[i:i + 1] for t in batch)).backward()
        for name, p in trainable_named_parameters(model):
            rows[name].append(p.grad.detach().float().cpu().clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(grads) for name, grads in rows.items()}


def _gap(found: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest difference relative to the reference's scale: max over tensors of
    max |found - reference| / max |reference|."""
    assert found.keys() == reference.keys() and all(found[n].shape == reference[n].shape for n in reference)
    return max(float((found[n].double() - reference[n].double()).abs().max()
                     / reference[n].double().abs().max().clamp_min(1e-30)) for n in reference)


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 matrix products in full fp32 (no TF32, whose 10-bit mantissa is ~1e-3), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@check("per-sample gradients, causal LM in fp32: the device's equal the CPU's and each example's alone")
def per_sample_fp32(device: str, folder: Path) -> str:
    """Opacus' per-sample gradients of causal_lm_loss on the device, against the same on the CPU
    and against a micro-batch reference on the device. Opacus ships its own reference
    (opacus.utils.per_sample_gradients_utils: check_per_sample_gradients_are_correct; 1.6 has no
    get_per_sample_gradient_diagnostics), but it takes one input tensor, splits it itself and puts
    an L1 loss on the module's output tensor: a causal LM takes (input_ids, attention_mask), returns
    a ModelOutput, and is trained on its own loss. So the micro-batch loop is done here, the way
    Opacus does it (each example alone, loss reduction "mean"). TF32 off and SDPA's math kernel:
    the comparison is of Opacus' arithmetic, not of a fused attention kernel's precision."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = _lm_batch(device)
    with _exact_fp32(), sdpa_kernel(SDPBackend.MATH):
        model = _tiny_lm(device, folder, dtype="float32")
        found, alone = _per_sample_grads(model, batch), _microbatch_grads(model, batch)
        on_cpu = _per_sample_grads(_tiny_lm("cpu", folder, dtype="float32"), _lm_batch("cpu"))
    against_cpu, against_alone = _gap(found, on_cpu), _gap(found, alone)
    assert against_cpu <= FP32_TOLERANCE and against_alone <= FP32_TOLERANCE, (against_cpu, against_alone)
    assert all(g.abs().max() > 0 for g in found.values())  # A and B: none trivially zero
    return (f"{len(found)} tensors x 4 padded examples; max |diff| / max |grad|: {device} vs cpu "
            f"{against_cpu:.1e}, vs each alone {against_alone:.1e} (<= {FP32_TOLERANCE:.0e})")


@check("per-sample gradients on an nf4 base: checkpointing on equals off exactly, and each example's alone")
def per_sample_nf4(device: str, folder: Path) -> str:
    """A 4-bit base computing in bf16 (QLoRA's setting), activation checkpointing on: each decoder
    layer runs forward twice (counted), Opacus records only the recomputation. Its per-sample
    gradients must equal, bit for bit, the same model's with checkpointing off (the same kernels
    on the same inputs; SDPA held to its math kernel, whose backward has no atomics), and be close
    to each example's alone (bf16: other shapes, other roundings)."""
    import bitsandbytes as bnb
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fedtune.common.models.causal_lm import set_activation_checkpointing

    model = _tiny_lm(device, folder, dtype="bfloat16", quantization="nf4", checkpointing=True)
    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert four_bit == 14, f"{four_bit} 4-bit layers, not 14"  # 2 layers x (q, k, v, o, gate, up, down)
    calls: list[int] = []
    model.get_base_model().model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    batch = _lm_batch(device)
    with _exact_fp32(), sdpa_kernel(SDPBackend.MATH):
        checkpointed = _per_sample_grads(model, batch)
        forwards = len(calls)
        set_activation_checkpointing(model, enabled=False)
        plain, alone = _per_sample_grads(model, batch), _microbatch_grads(model, batch)
    assert forwards == 2 and len(calls) == 3 + 4, (forwards, len(calls))  # 2 with, 1 without, 4 alone
    differ = [name for name in plain if not torch.equal(checkpointed[name], plain[name])]
    assert not differ, f"{len(differ)} tensors differ, by up to {_gap(checkpointed, plain):.1e} relative"
    against_alone = _gap(plain, alone)
    assert against_alone <= BF16_TOLERANCE, against_alone
    assert all(g.abs().max() > 0 for g in plain.values())  # A and B: none trivially zero
    return (f"{four_bit} 4-bit layers, layer 0 ran forward {forwards}x checkpointed; checkpointed == plain "
            f"exactly; vs each alone {against_alone:.1e} (<= {BF16_TOLERANCE:.0e}, bf16)")


@check("per-sample gradients on an int8 base: each example's equals its gradient alone (no outlier mixing)")
def per_sample_int8(device: str, folder: Path) -> str:
    """LLM.int8() with the profile's outlier threshold 0: no column of the batch is kept aside because
    another example's activation exceeded a threshold, so each example's per-sample gradient is its
    gradient alone (within fp16 rounding: bitsandbytes computes the 8-bit products in fp16). On CUDA
    a nonzero threshold would mix examples; this is the line that would show it."""
    import bitsandbytes as bnb

    model = _tiny_lm(device, folder, dtype="float32", quantization="int8")
    eight_bit = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    assert eight_bit == 14 and all(m.state.threshold == 0.0 for m in model.modules()
                                   if isinstance(m, bnb.nn.Linear8bitLt)), eight_bit
    batch = _lm_batch(device)
    found, alone = _per_sample_grads(model, batch), _microbatch_grads(model, batch)
    against_alone = _gap(found, alone)
    assert against_alone <= BF16_TOLERANCE, against_alone
    assert all(g.abs().max() > 0 for g in found.values())
    return f"{eight_bit} 8-bit layers, threshold 0; vs each alone {against_alone:.1e} (<= {BF16_TOLERANCE:.0e})"


# -- a federation of causal-LM clients in bf16 and in nf4 ---------------------------------------

CHAT = {"weather": ("What is the weather like in {x}?", "It is sunny and warm in {x} today."),
        "food": ("What should I cook with {x}?", "A simple soup with {x} is a good choice.")}
PLACES = "Paris Lima Oslo Rome Cairo Delhi Quito Seoul Berlin Dakar".split()


def _chat_jsonl(path: Path) -> Path:
    """20 prompt/response pairs in 2 categories (tests/conftest.py's make_chat_pairs, shortened)."""
    rows = [{"prompt": ask.format(x=x), "response": say.format(x=x), "category": topic}
            for topic, (ask, say) in CHAT.items() for x in PLACES]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _federation(device: str, folder: Path, *, quantization: str) -> str:
    """One round of 2 clients, DP-SGD and SecAgg+, on the tiny random Llama (SmolLM2's tokenizer) in
    the in-process engine (the real ServerApp and ClientApps), then the run audited from its ledgers.
    sigma is given (1.0) rather than calibrated: the accountant's search is not what this checks."""
    from benchmarks.random_llama import random_llama_folder
    from fedtune.common.config import RunConfig
    from fedtune.common.ledger.audit import audit_run
    from fedtune.common.ledger.chain import LEDGER_FILE, read_records
    from fedtune.simulations import inprocess

    config = RunConfig(task="causal-lm", model=str(random_llama_folder("tiny")), num_clients=2,
                       data=str(_chat_jsonl(folder.parent / "chat.jsonl")), clients_per_round=2, num_rounds=1,
                       batch_size=8, max_length=64, learning_rate=0.02, lora_rank=4, lora_variant="lora",
                       partitioner="category", test_fraction=0.15, samples=0, dp=True, secure_aggregation=True,
                       noise_multiplier=1.0, accountant="rdp", target_epsilon=100.0, device=device,
                       base_dtype="bfloat16", quantization=quantization)
    grid, run_dir = inprocess.federation(config, folder.parent / f"federation-{quantization}")
    with _quiet("flwr"):  # its round log would run through the table
        inprocess.run(grid, config, run_dir)
    errors = [reply.error.reason for reply in grid.replies if reply.has_error()]
    assert not errors, f"{len(errors)} client error(s): {errors[0]}"
    audit = audit_run(target=run_dir.path)
    trained = [row for row in audit.rows if row.status == "trained"]
    assert audit.exit_code == 0 and len(trained) == 2, (audit.verdict, audit.problems, len(trained))
    profiles = {json.dumps(record["profile"], sort_keys=True) for client in ("client-0", "client-1")
                for record in read_records(run_dir.path / "ledgers" / client / LEDGER_FILE)
                if record.get("status") == "trained"}
    profile = json.loads(profiles.pop()) if len(profiles) == 1 else {}
    want = {"device": str(torch.device(device)), "base-dtype": "bfloat16", "quantization": quantization}
    assert all(str(profile.get(k, "")).startswith(v) for k, v in want.items()), profiles or profile
    epsilon = max(row.recomputed_epsilon for row in trained)
    return (f"2 clients trained on {profile['device']}, {profile['base-dtype']}, quantization "
            f"{profile['quantization']} (their ledgers say); audit {audit.verdict}, eps {epsilon:.2f}")


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@check("a 2-client DP + SecAgg+ causal-LM federation on a bf16 base, audited")
def federation_bf16(device: str, folder: Path) -> str:
    return _federation(device, folder, quantization="none")


@check("a 2-client DP + SecAgg+ causal-LM federation on an nf4 base (bf16 compute), audited")
def federation_nf4(device: str, folder: Path) -> str:
    return _federation(device, folder, quantization="nf4")


# -- a billion parameters: step time and peak GPU memory per precision ---------------------------

PRECISIONS = (("fp32", "float32", "none"), ("bf16", "bfloat16", "none"), ("nf4", "bfloat16", "nf4"))


@check("one DP-SGD step of a random 1.07B Llama, batch 8 x 256 tokens: step time and peak GPU memory")
def billion(device: str, folder: Path) -> str:
    if torch.device(device).type != "cuda":
        raise Skipped(f"skipped on {device} (see benchmarks.quantized_memory)")
    from benchmarks.random_llama import random_llama_folder

    return _step_per_precision(device, random_llama_folder("1b"), length=256)


def _step_per_precision(device: str, path: Path, *, length: int, batch: int = 8) -> str:
    """Modelled on benchmarks.causal_lm_memory's measure: full-length examples, the causal-lm run
    config's LoRA, a plan of sample rate 1 (every step takes all `batch`). Per precision, one
    warm-up step, then one timed; the peak counts from before the model is built, so it holds
    weights, activations, per-sample gradients and optimizer state."""
    from fedtune.common.data.instructions import InstructionSplit
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.tasks.chat_tokens import encode_pairs

    words = " ".join(["privacy"] * length)  # every response is cut to fill `length` tokens exactly
    split = InstructionSplit(prompts=[f"Question {i}?" for i in range(batch)], responses=[words] * batch,
                             labels=[0] * batch)
    dataset = encode_pairs(tokenizer=load_tokenizer(path), split=split, max_length=length)
    assert dataset.tensors[1].sum(dim=1).min() == length
    parts = []
    for label, dtype, quantization in PRECISIONS:
        seconds, peak = _billion_step(device, path, dataset, dtype=dtype, quantization=quantization)
        parts.append(f"{label} {seconds:.2f} s {peak:.1f} GiB")
    return "; ".join(parts)


def _billion_step(device: str, path: Path, dataset: TensorDataset, *, dtype: str,
                  quantization: str) -> tuple[float, float]:
    from fedtune.client.trainer import train_locally
    from fedtune.common.config import RunConfig
    from fedtune.common.execution import ExecutionProfile
    from fedtune.common.models.causal_lm import build_lora_causal_lm, causal_lm_loss
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.privacy.plan import PrivacyPlan

    _free_gpu_memory()
    torch.cuda.reset_peak_memory_stats(device)
    model = build_lora_causal_lm(model_path=path, lora=LoraSettings.from_config(RunConfig(task="causal-lm")),
                                 seed=0, profile=ExecutionProfile(device=device, base_dtype=dtype,
                                                                  quantization=quantization))
    plan = PrivacyPlan(num_examples=len(dataset), sample_rate=1.0, steps_per_round=1, noise_multiplier=1.0,
                       planned_rounds=1, target_epsilon=1e9, target_delta=1e-5, accountant="rdp")

    def step() -> None:
        train_locally(model=model, dataset=dataset, loss=causal_lm_loss, learning_rate=1e-3, batch_size=len(dataset),
                      local_epochs=1, max_grad_norm=1.0, plan=plan, history=[], seed=0)
        torch.cuda.synchronize(device)

    step()  # warm-up: kernels chosen and loaded, workspaces allocated
    started = time.perf_counter()
    step()
    seconds, peak = time.perf_counter() - started, torch.cuda.max_memory_allocated(device) / 2**30
    del model
    _free_gpu_memory()
    return seconds, peak


def _free_gpu_memory() -> None:
    from fedtune.common.models.host import forget_all

    forget_all()  # the model host keeps each process's base: drop it
    gc.collect()
    torch.cuda.empty_cache()


# -- the torch build ---------------------------------------------------------------------------

@check("the torch build this ran on, and the pip line for a torch of the pinned version on its CUDA")
def torch_build(device: str, folder: Path) -> str:
    pin = _torch_pin()
    cuda = torch.version.cuda
    wheel = f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    gpu = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "no GPU used"
    return (f"torch {torch.__version__} (pin {pin}), CUDA {cuda or 'none: the CPU wheel'}, {gpu}; "
            f"pip install torch=={pin} --index-url https://download.pytorch.org/whl/{wheel}")


def _torch_pin() -> str:
    """The torch version pyproject.toml pins (torch==X), else the one running."""
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        for requirement in tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]:
            if requirement.replace(" ", "").startswith("torch=="):
                return requirement.replace(" ", "").removeprefix("torch==")
    return torch.__version__.split("+")[0]


def run(device: str) -> int:
    """Every check on `device`, one line each (its result and seconds); 0 when none failed."""
    from benchmarks.tiny_model import save_tiny_bert

    counts = {"ok": 0, "skip": 0, "FAIL": 0}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtune-gpu-check-") as scratch:
        folder = save_tiny_bert(Path(scratch) / "tiny-bert")
        for name, function in CHECKS:
            started = time.perf_counter()
            try:
                status, text = "ok", function(device, folder)
            except Skipped as skipped:
                status, text = "skip", str(skipped)
            except Exception as exc:  # noqa: BLE001 - each line says what failed, the rest still run
                status, text = "FAIL", f"{type(exc).__name__}: {exc}"
            counts[status] += 1
            print(f"{status:<5} {name}: {text} [{time.perf_counter() - started:.1f} s]", flush=True)
    print(f"gpu-check on {device}: {counts['ok']} ok, {counts['skip']} skipped, {counts['FAIL']} failed, "
          f"{time.perf_counter() - began:.0f} s", flush=True)
    return 1 if counts["FAIL"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the same checks on this CPU)")
    device = parser.parse_args(argv).device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA GPU here; run it on the GPU machine, or --device cpu", file=sys.stderr)
        return 2
    return run(device)


if __name__ == "__main__":
    sys.exit(main())
