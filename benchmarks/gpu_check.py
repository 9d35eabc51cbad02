"""`make gpu-check`: every device and precision path of the execution profile, on one GPU, in a minute.

Each line names a path the CPU tests cover on the CPU and checks it where it can break on a GPU:
the base in bf16 on the device with fp32 trainables, LoRA A identical to an fp32 build, a DP step
with the sampler's generator on the CPU and the noise's on the device, the empty-batch gradient,
pooled features computed on the device and cached as fp32 on the CPU, and seeded builds that leave
the CUDA RNG as they found it. `--device cpu` runs the same checks here (tests/test_gpu_check.py).

    python -m benchmarks.gpu_check [--device cuda]   # exit 0: every line ok; 1: a line failed; 2: no GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import TensorDataset

CHECKS: list[tuple[str, Callable[[str, Path], str]]] = []


def check(name: str):
    def register(function: Callable[[str, Path], str]):
        CHECKS.append((name, function))
        return function
    return register


def _classifier(device: str, folder: Path, *, dtype: str = "bfloat16", mode: str = "probe"):
    from common.execution import ExecutionProfile
    from common.models.lora import LoraSettings
    from common.models.pooled_classifier import HeadSettings
    from common.tasks import get_task

    return get_task("classification").build_model(
        model_path=folder, num_labels=3, lora=LoraSettings(rank=4, alpha=8, variant="ffa"), seed=0,
        head=HeadSettings(mode=mode), profile=ExecutionProfile(device=device, base_dtype=dtype))


def _records(n: int = 24) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, 16), generator=generator)
    return TensorDataset(ids, torch.ones_like(ids), torch.arange(n) % 3)


@check("base in bf16 on the device, trainables fp32 there, FFA's A equal to an fp32 build's")
def base_and_trainables(device: str, folder: Path) -> str:
    from common.execution import base_dtype_name, check_trainables_fp32, device_of
    from common.models.lora import lora_a_sha256

    model = _classifier(device, folder, mode="two-stage")
    check_trainables_fp32(model)
    assert base_dtype_name(model) == "bfloat16" and device_of(model).type == torch.device(device).type
    assert lora_a_sha256(model) == lora_a_sha256(_classifier(device, folder, dtype="float32", mode="two-stage"))
    return f"{device_of(model)}, base {base_dtype_name(model)}"


@check("a DP step: sampler generator on the CPU, noise generator on the device, an empty batch noised")
def dp_step(device: str, folder: Path) -> str:
    import client.trainer
    from client.trainer import train_locally
    from common.privacy.noise import private_generator
    from common.privacy.plan import PrivacyPlan
    from common.tasks import get_task

    made: list[str] = []

    def recording(**kwargs):
        generator = private_generator(**kwargs)
        made.append(str(generator.device))
        return generator

    original, client.trainer.private_generator = client.trainer.private_generator, recording
    try:
        model, data = _classifier(device, folder, mode="two-stage"), _records()
        plan = PrivacyPlan(num_examples=len(data), sample_rate=0.02, steps_per_round=50, noise_multiplier=1.0,
                           planned_rounds=1, target_epsilon=1e9, target_delta=1e-5, accountant="rdp")
        result = train_locally(model=model, dataset=data, loss=get_task("classification").loss, learning_rate=0.1,
                               batch_size=1, local_epochs=1, max_grad_norm=1.0, plan=plan, history=[], seed=0)
    finally:
        client.trainer.private_generator = original
    assert made[0] == "cpu" and made[1].split(":")[0] == torch.device(device).type, made
    assert result.steps == 50  # 1/q steps; at q = 0.02 over 24 records most Poisson batches are empty
    return f"generators {made}, {result.steps} steps"


@check("pooled features computed on the device, cached on disk as fp32 on the CPU, read back")
def features(device: str, folder: Path) -> str:
    from common.models import pooled_features

    model, data = _classifier(device, folder), _records()
    computed = pooled_features.cached_pooled_features(model=model, dataset=data, cache_dir=folder / "features")
    pooled_features.clear_memory()
    again = pooled_features.cached_pooled_features(model=model, dataset=data, cache_dir=folder / "features")
    vectors = computed.tensors[0]
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu" and torch.equal(vectors, again.tensors[0])
    return f"{tuple(vectors.shape)} float32, one file"


@check("a causal LM on a bf16 base: a DP step and the held-out loss on the device, the loss in fp32")
def causal_lm(device: str, folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from client.trainer import train_locally
    from common.execution import ExecutionProfile, seeded_rng
    from common.models.causal_lm import build_lora_causal_lm, causal_lm_loss
    from common.models.lora import LoraSettings
    from common.privacy.plan import PrivacyPlan
    from common.tasks.causal_lm import evaluate_causal_lm

    llama = folder.parent / "tiny-llama"
    if not llama.exists():
        config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        with seeded_rng(0):
            LlamaForCausalLM(config).save_pretrained(str(llama))
    model = build_lora_causal_lm(model_path=llama, lora=LoraSettings(rank=4, alpha=8), seed=0,
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


def run(device: str) -> int:
    """Every check on `device`, one line each; 0 when all pass."""
    from benchmarks.tiny_model import save_tiny_bert

    failed = 0
    with tempfile.TemporaryDirectory(prefix="fedtune-gpu-check-") as scratch:
        folder = save_tiny_bert(Path(scratch) / "tiny-bert")
        for name, function in CHECKS:
            try:
                print(f"ok    {name}: {function(device, folder)}", flush=True)
            except Exception as exc:  # noqa: BLE001 - each line says what failed, the rest still run
                failed += 1
                print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


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
