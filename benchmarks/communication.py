"""What one client uploads per round, against the size of the model it adapts.

    python -m benchmarks.communication [--quick]

For each model and LoRA variant the adapter is built exactly as a client builds it, and its
update is serialized the way Flower serializes it (`server.federation.upload_bytes`, the
figure every run writes to metrics.jsonl): float32 arrays for plain FedAvg, int64 masked
fixed-point words (plus the weight) for SecAgg+. The full model is every parameter of the
base model with its head, in float32, as a full-model federation would send it. SecAgg+'s
key exchange and share messages are extra and do not grow with the model; they are left out.
--quick skips SmolLM2 (whose first use converts a GGUF file).
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.harness import machine, markdown_table, publish, write_result

NAME = "communication"
VARIANTS = ("lora", "ffa")


def measure(*, task: str, label: str) -> list[dict]:
    from flwr.common import ndarray_to_bytes

    from fedtune.common.config import RunConfig
    from fedtune.common.models.adapter import adapter_to_arrays
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.tasks import build_lora_model, resolve_model_path
    from fedtune.server.bookkeeping import upload_bytes

    path = resolve_model_path("default", task=task)
    rows = []
    for variant in VARIANTS:
        config = RunConfig(task=task, lora_variant=variant)
        model = build_lora_model(task=task, model_path=path, num_labels=5, lora=LoraSettings.from_config(config),
                                 seed=0)
        arrays = adapter_to_arrays(model)
        base = model.get_base_model()
        # The full model a full-model federation would send: base weights (LoRA excluded) and head.
        full = [p.detach().float().numpy() for name, p in base.named_parameters() if "lora_" not in name
                and "modules_to_save" not in name]
        full_bytes = sum(len(ndarray_to_bytes(a)) for a in full)
        rows.append({"model": label, "variant": variant, "adapter_parameters": int(sum(a.size for a in arrays)),
                     "model_parameters": int(sum(a.size for a in full)),
                     "plain_bytes": upload_bytes(arrays, secure=False),
                     "secagg_bytes": upload_bytes(arrays, secure=True), "full_model_bytes": full_bytes})
    return rows


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        rows.append([r["model"], r["variant"], f"{r['adapter_parameters']:,}", f"{r['plain_bytes']:,}",
                     f"{r['secagg_bytes']:,}", f"{r['full_model_bytes']:,}",
                     f"{100 * r['plain_bytes'] / r['full_model_bytes']:.2f}%",
                     f"{100 * r['secagg_bytes'] / r['full_model_bytes']:.2f}%"])
    return (f"Machine: {result['machine']}. LoRA r=8 on the default attention targets; bytes are one client's "
            f"update in one round. Command: `{result['command']}`.\n\n"
            + markdown_table(["model", "variant", "parameters sent", "bytes, plain FedAvg", "bytes, SecAgg+",
                              "full model bytes", "plain / full", "SecAgg+ / full"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only")
    args = parser.parse_args()
    rows = measure(task="classification", label="all-MiniLM-L6-v2 (classifier, 5 labels)")
    if not args.quick:
        rows += measure(task="causal-lm", label="SmolLM2-135M-Instruct (causal LM)")
    result = {"rows": rows, "command": "make bench-quick" if args.quick else "make bench"}
    write_result(NAME, result, quick=args.quick)
    publish(NAME, render({**result, "machine": machine()}), quick=args.quick)


if __name__ == "__main__":
    main()
