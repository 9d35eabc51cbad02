"""Peak memory and DP-SGD step time of one causal-LM client by base precision: SmolLM2-135M and a
1B-parameter random Llama (benchmarks/random_llama.py), fp32, bf16 and nf4, batch 8, every
example a full 256-token sequence.

Each cell runs in a fresh process, so its peak resident set size (ru_maxrss) is the client's own:
the base as loaded (the peak includes reading the checkpoint), LoRA, activations, Opacus'
per-sample gradients, and the Python and torch runtime. A cell times `steps` DP steps (sample
rate 1: every step takes all 8 examples) after one warm-up step. The cells run one after another
in one invocation, so their ratios compare like with like.

    python -m benchmarks.quantized_memory [--steps 1] [--only smollm2|1b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import update_benchmarks_md

RESULTS = Path(__file__).parent / "results" / "quantized_memory.json"
BATCH, LENGTH = 8, 256
BUDGET_GIB = 6.0  # the goal for a 1B model per client process
# (model, precision label, base-dtype, quantization, activation checkpointing)
CELLS = [("smollm2", "fp32", "float32", "none", False), ("smollm2", "bf16", "bfloat16", "none", False),
         ("smollm2", "nf4", "bfloat16", "nf4", False),
         ("1b", "fp32", "float32", "none", False), ("1b", "bf16", "bfloat16", "none", False),
         ("1b", "nf4", "bfloat16", "nf4", False), ("1b", "nf4 + checkpointing", "bfloat16", "nf4", True)]


def measure(*, model: str, base_dtype: str, quantization: str, checkpointing: bool, steps: int) -> dict:
    """One cell, in this (fresh) process."""
    import resource

    import torch

    from benchmarks.random_llama import parameter_count, random_llama_folder
    from fedtune.client.trainer import train_locally
    from fedtune.common.data.instructions import InstructionSplit
    from fedtune.common.execution import ExecutionProfile
    from fedtune.common.models.causal_lm import build_lora_causal_lm, causal_lm_loss
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.models.memory import release_freed_memory
    from fedtune.common.privacy.plan import PrivacyPlan
    from fedtune.common.tasks import resolve_model_path
    from fedtune.common.tasks.chat_tokens import encode_pairs

    torch.set_num_threads(os.cpu_count() or 1)
    release_freed_memory()  # as a causal-lm client does before training
    path = random_llama_folder("1b") if model == "1b" else resolve_model_path("default", task="causal-lm")
    words = " ".join(["privacy"] * LENGTH)  # every response is cut to fill the length exactly
    split = InstructionSplit(prompts=[f"Question {i}?" for i in range(BATCH)], responses=[words] * BATCH,
                             labels=[0] * BATCH)
    dataset = encode_pairs(tokenizer=load_tokenizer(path), split=split, max_length=LENGTH)
    profile = ExecutionProfile(device="cpu", base_dtype=base_dtype, quantization=quantization,
                               activation_checkpointing=checkpointing, physical_batch_size=BATCH)
    started = time.perf_counter()
    lora = LoraSettings(rank=8, alpha=16, variant="ffa")  # the causal-lm benchmark's adapter (attention)
    net = build_lora_causal_lm(model_path=path, lora=lora, seed=0, profile=profile)
    load_seconds = time.perf_counter() - started
    plan = PrivacyPlan(num_examples=BATCH, sample_rate=1.0, steps_per_round=1, noise_multiplier=1.0,
                       planned_rounds=1, target_epsilon=1e9, target_delta=1e-5, accountant="rdp")

    def step() -> None:
        train_locally(model=net, dataset=dataset, loss=causal_lm_loss, learning_rate=1e-3, batch_size=BATCH,
                      local_epochs=1, max_grad_norm=1.0, plan=plan, history=[], seed=0,
                      physical_batch_size=BATCH)

    step()  # warm-up: first-touch allocations, Opacus' hooks
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return {"model": model, "base_dtype": base_dtype, "quantization": quantization, "checkpointing": checkpointing,
            "parameters_b": round(parameter_count(path) / 1e9, 3),  # as stored: 4-bit weights pack two a byte
            "load_seconds": round(load_seconds, 1),
            "seconds_per_step": round((time.perf_counter() - started) / steps, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--only", choices=["smollm2", "1b"])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, printed, not published")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process mode: a JSON cell
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one), steps=args.steps)))
        return
    rows = []
    for model, label, base_dtype, quantization, checkpointing in CELLS:
        if (args.only and model != args.only) or (args.quick and model != "smollm2"):
            continue
        cell = {"model": model, "base_dtype": base_dtype, "quantization": quantization,
                "checkpointing": checkpointing}
        command = [sys.executable, "-m", "benchmarks.quantized_memory", "--one", json.dumps(cell),
                   "--steps", str(args.steps)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append({**json.loads(out.strip().splitlines()[-1]), "precision": label})
        print(rows[-1], flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
              "command": " ".join(["python -m benchmarks.quantized_memory", *sys.argv[1:]]), "results": rows}
    table = render(result)
    print(table)
    if args.quick or args.only:
        return  # a partial run never replaces the published one
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    update_benchmarks_md(table, name="quantized-memory")


def render(result: dict) -> str:
    names = {"smollm2": "SmolLM2-135M", "1b": "Llama 1B (random)"}
    lines = [f"Machine: {result['machine']}. Command: `{result['command']}`. DP-SGD (Opacus), batch {BATCH}, "
             f"{LENGTH} tokens per example, LoRA r=8 on attention; peak RSS of the client's whole process.", "",
             "| model | parameters | base | load (s) | seconds per DP step | peak RSS (GiB) |",
             "|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {names[r['model']]} | {r['parameters_b']:.2f}B | {r['precision']} | {r['load_seconds']:.0f} "
                     f"| {r['seconds_per_step']:.1f} | {r['peak_rss_gib']:.2f} |")
    big = {r["precision"]: r for r in result["results"] if r["model"] == "1b"}
    if "fp32" in big and "nf4" in big:
        fits = [label for label, r in big.items() if r["peak_rss_gib"] <= BUDGET_GIB]
        lines.append(f"\n1B under DP: peak {big['fp32']['peak_rss_gib']:.2f} GiB in fp32, "
                     f"{big['nf4']['peak_rss_gib']:.2f} GiB in nf4 "
                     f"({big['fp32']['peak_rss_gib'] / big['nf4']['peak_rss_gib']:.2f}x less); within "
                     f"{BUDGET_GIB:g} GiB: {', '.join(fits) or 'none'}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
