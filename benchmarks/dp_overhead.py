"""What DP-SGD costs per local step: non-private LoRA against Opacus' two ways to clip.

    python -m benchmarks.dp_overhead [--quick]

MiniLM (the default model) with the default LoRA adapter and head, BBC News texts at
max-length 128, batch 32: the demo client's step. Three copies of the same model train side by
side in one process on the very same batches, interleaved (a round of steps of each mode, then
the next round), so machine noise hits all three alike:
- non-private: AdamW on the mean loss;
- DP hooks: Opacus GradSampleModule materialises per-example gradients of the adapter, clips
  each, adds noise (what fedtune clients run);
- DP ghost: Opacus ghost clipping computes per-example gradient norms without materialising
  them, then a second backward pass on the reweighted loss.
Peak memory of each mode is measured in its own fresh process over 3 steps (Linux' VmHWM, reset
after loading), so each mode's peak is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import ROOT, log, machine, markdown_table, publish, write_result

MODES = ("non-private", "DP hooks", "DP ghost")
NAME = "dp_overhead"


class Stepper:
    """One mode's model, optimizer and a step function on a batch (input_ids, mask, labels)."""

    def __init__(self, mode: str, *, num_labels: int, batch_size: int) -> None:
        import torch
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        from fedtune.common.models.adapter import trainable_named_parameters
        from fedtune.common.models.classifier import build_lora_classifier
        from fedtune.common.models.lora import LoraSettings
        from fedtune.common.tasks import resolve_model_path

        self.mode = mode
        model = build_lora_classifier(model_path=resolve_model_path("default"), num_labels=num_labels,
                                      lora=LoraSettings(), seed=0)
        model.train()
        optimizer = torch.optim.AdamW([p for _, p in trainable_named_parameters(model)], lr=5e-3,
                                      weight_decay=0.0)
        criterion = torch.nn.CrossEntropyLoss()
        noise = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": batch_size}
        if mode == "non-private":
            self.model, self.optimizer, self.criterion = model, optimizer, criterion
        elif mode == "DP hooks":
            self.model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            self.optimizer = DPOptimizer(optimizer, **noise)
            self.criterion = criterion
        elif mode == "DP ghost":
            self.model = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                              max_grad_norm=1.0, use_ghost_clipping=True)
            self.optimizer = DPOptimizerFastGradientClipping(optimizer, **noise)
            self.criterion = DPLossFastGradientClipping(self.model, self.optimizer, criterion, "mean")
        else:
            raise ValueError(mode)

    def step(self, batch) -> float:
        input_ids, attention_mask, labels = batch
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = self.criterion(logits, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


def batches(*, count: int, batch_size: int, max_length: int):
    """`count` fixed batches of BBC News training texts, tokenized like a client does."""
    from fedtune.common.config import RunConfig
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.tasks import resolve_model_path
    from fedtune.common.run_data import federated_splits
    from fedtune.common.tasks.classification import encode

    splits = federated_splits(RunConfig(num_clients=1, clients_per_round=1, secure_aggregation=False))
    data = encode(tokenizer=load_tokenizer(resolve_model_path("default")), split=splits.clients[0].train,
                  max_length=max_length)
    out = []
    for index in range(count):
        rows = [(index * batch_size + j) % len(data) for j in range(batch_size)]
        out.append([t[rows] for t in data.tensors])
    return out, len(splits.label_names)


def measure_time(*, rounds: int, steps: int, batch_size: int, max_length: int) -> dict:
    import torch

    torch.set_num_threads(2)
    data, num_labels = batches(count=steps, batch_size=batch_size, max_length=max_length)
    steppers = [Stepper(mode, num_labels=num_labels, batch_size=batch_size) for mode in MODES]
    for stepper in steppers:  # warm-up: first-call allocations and hook set-up
        stepper.step(data[0])
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for index in range(rounds):
        for stepper in steppers:
            started = time.perf_counter()
            for batch in data:
                stepper.step(batch)
            seconds[stepper.mode].append((time.perf_counter() - started) / len(data))
        log(f"dp-overhead round {index + 1}/{rounds}: "
            + ", ".join(f"{m} {seconds[m][-1]:.3f} s/step" for m in MODES))
    return {mode: {"seconds_per_step": statistics.median(values), "all": values} for mode, values in seconds.items()}


def measure_memory(mode: str, *, steps: int, batch_size: int, max_length: int) -> dict:
    """Run in a fresh process: the exact peak resident memory while training `steps` steps.

    Linux keeps the peak (VmHWM); writing 5 to /proc/self/clear_refs resets it to the current
    size after the model and data are loaded, so what is read afterwards is the training peak.
    """
    import gc

    import torch

    torch.set_num_threads(2)
    data, num_labels = batches(count=steps, batch_size=batch_size, max_length=max_length)
    stepper = Stepper(mode, num_labels=num_labels, batch_size=batch_size)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for batch in data:
        stepper.step(batch)
    peak = _status_kib("VmHWM")
    return {"peak_rss_gib": peak / 2**20, "training_gib": (peak - before) / 2**20}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def render(result: dict) -> str:
    base = result["modes"]["non-private"]["seconds_per_step"]
    rows = []
    for mode in MODES:
        entry = result["modes"][mode]
        rows.append([mode, f"{entry['seconds_per_step']:.3f}", f"{entry['seconds_per_step'] / base:.2f}x",
                     f"{entry['peak_rss_gib']:.2f}", f"{entry['training_gib']:.2f}"])
    cfg = result["config"]
    return (f"Machine: {result['machine']}. MiniLM + LoRA r=8 (q, v) + head, max-length {cfg['max_length']}, "
            f"batch {cfg['batch_size']}, {cfg['steps']} steps x {cfg['rounds']} interleaved rounds (median). "
            f"Command: `{result['command']}`.\n\n"
            + markdown_table(["mode", "s / step", "vs non-private", "peak RSS, 3 steps (GiB)", "added by training (GiB)"],
                             rows)
            + f"\n\nFastest DP mode: **{result['fastest_dp_mode']}**.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--memory-of", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    config = {"batch_size": 32, "max_length": 128, "steps": 3 if args.quick else 6,
              "rounds": 2 if args.quick else 4}
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, steps=3, batch_size=config["batch_size"],
                                        max_length=config["max_length"])))
        return
    modes = measure_time(rounds=config["rounds"], steps=config["steps"], batch_size=config["batch_size"],
                         max_length=config["max_length"])
    for mode in MODES:
        child = subprocess.run([sys.executable, "-m", "benchmarks.dp_overhead", "--memory-of", mode], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"memory measurement of {mode} failed (its error is above)")
        modes[mode].update(json.loads(child.stdout.strip().splitlines()[-1]))
    fastest = min(("DP hooks", "DP ghost"), key=lambda m: modes[m]["seconds_per_step"])
    result = {"config": config, "modes": modes, "fastest_dp_mode": fastest,
              "command": "make bench-quick" if args.quick else "make bench"}
    write_result(NAME, result, quick=args.quick)
    publish(NAME, render({**result, "machine": machine()}),
            quick=args.quick)


if __name__ == "__main__":
    main()
