"""Peak memory and step time of one causal-LM client: SmolLM2-135M-Instruct, LoRA, batch 8,
every example a full max-length sequence (the worst case of `max-length`).

Each measurement runs in a fresh process, so its peak resident set size (ru_maxrss) is the
client's own: model, tokenizer, activations, Opacus' per-sample gradients, and the Python and
torch runtime. Run: `python -m benchmarks.causal_lm_memory [--max-length 256] [--batch 8]`.
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

RESULTS = Path(__file__).parent / "results" / "causal_lm_memory.json"


def measure(*, dp: bool, batch: int, max_length: int, steps: int, lora_mlp: bool) -> dict:
    """Train `steps` steps of exactly `batch` full-length examples; report the process peak."""
    import resource

    import torch

    from fedtune.client.trainer import train_locally
    from fedtune.common.tasks.chat_tokens import encode_pairs
    from fedtune.common.config import RunConfig
    from fedtune.common.data.instructions import InstructionSplit
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.tasks import build_lora_model, resolve_model_path
    from fedtune.common.privacy.plan import PrivacyPlan

    from fedtune.common.models.memory import release_freed_memory
    from fedtune.common.tasks import get_task

    torch.set_num_threads(2)
    release_freed_memory()  # as a causal-lm client does before training
    config = RunConfig(task="causal-lm", lora_mlp=lora_mlp, lora_variant="ffa")  # what BENCHMARKS.md reports
    path = resolve_model_path("default", task="causal-lm")
    tokenizer = load_tokenizer(path)
    words = " ".join(["privacy"] * max_length)  # every response is cut to fill max-length exactly
    split = InstructionSplit(prompts=[f"Question {i}?" for i in range(batch)], responses=[words] * batch,
                             labels=[0] * batch)
    dataset = encode_pairs(tokenizer=tokenizer, split=split, max_length=max_length)
    assert dataset.tensors[1].sum(dim=1).min() == max_length
    model = build_lora_model(task="causal-lm", model_path=path, num_labels=0, lora=LoraSettings.from_config(config),
                             seed=0)
    # Sample rate 1: Poisson sampling then takes all `batch` examples at every step.
    plan = PrivacyPlan(num_examples=batch, sample_rate=1.0, steps_per_round=steps, noise_multiplier=1.0,
                       planned_rounds=1, target_epsilon=1e9, target_delta=1e-5, accountant="rdp") if dp else None
    started = time.perf_counter()
    train_locally(model=model, dataset=dataset, loss=get_task("causal-lm").loss, learning_rate=1e-3, batch_size=batch, local_epochs=steps,
                  max_grad_norm=1.0, plan=plan, history=[], seed=0)
    seconds = (time.perf_counter() - started) / steps
    return {"dp": dp, "batch": batch, "max_length": max_length, "lora_mlp": lora_mlp, "steps": steps,
            "seconds_per_step": round(seconds, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", choices=["dp", "plain"], help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--lora-mlp", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(dp=args.one == "dp", batch=args.batch, max_length=args.max_length,
                                 steps=args.steps, lora_mlp=args.lora_mlp)))
        return
    rows = []
    for mode in ("plain", "dp"):
        command = [sys.executable, "-m", "benchmarks.causal_lm_memory", "--one", mode, "--batch", str(args.batch),
                   "--max-length", str(args.max_length), "--steps", str(args.steps)]
        command += ["--lora-mlp"] if args.lora_mlp else []
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
              "command": " ".join(["python -m benchmarks.causal_lm_memory", *sys.argv[1:]]), "results": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    update_benchmarks_md(table, name="causal-lm-memory")
    print(table)


def render(result: dict) -> str:
    rows = {r["dp"]: r for r in result["results"]}
    lines = [f"Machine: {result['machine']}. Command: `{result['command']}`.", "",
             "| training | batch | tokens per example | LoRA on MLP | seconds per step | peak RSS (GiB) |",
             "|---|---|---|---|---|---|"]
    for dp in (False, True):
        r = rows[dp]
        lines.append(f"| {'DP-SGD (Opacus hooks)' if dp else 'non-private'} | {r['batch']} | {r['max_length']} "
                     f"| {'yes' if r['lora_mlp'] else 'no'} | {r['seconds_per_step']:.2f} | {r['peak_rss_gib']:.2f} |")
    lines.append(f"\nDP step time / non-private: {rows[True]['seconds_per_step'] / rows[False]['seconds_per_step']:.2f}x.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
