"""Defaults on data nobody tuned them on (issue 33): the default private federated run of each
dataset next to the ceilings of the same features, measured in the same run.

    python -m benchmarks.held_out_utility [--datasets NAME ...] [--seeds 3] [--epsilons 1 3 8]
                                          [--no-adapter-ceiling] [--quick] [--out DIR]

Each dataset is written once as a CSV (benchmarks/datasets.py: a fixed-seed stratified sample of a
packaged corpus), then for each seed (the split, the sampling and the noise change with it):
- the default run at each budget: every key at its default but the budget, 3 clients, all sampled,
  3 rounds, DP-SGD + SecAgg+, the real ServerApp and ClientApps in this process
  (simulations/inprocess.py; the clients' pooled features are computed once per seed);
- the probe ceiling: a centralized, non-private logistic regression (scikit-learn, converged) on the
  very features the run's head reads (the same encoder, pooling and truncation), all clients'
  training records pooled, scored on the run's test split;
- the adapter ceiling (seed 0 only): centralized, non-private LoRA and head on the same pooled
  training records, 3 epochs, with the clients' own training code.
Each row: macro-F1 and accuracy (mean ± std over seeds), the share of test predictions in the
largest class (1.0 is a single-class model), and the run's macro-F1 as a share of the probe ceiling's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.datasets import DATASETS, dataset_csv
from benchmarks.harness import default_out, log, machine, markdown_table, publish, write_result

NAME = "held_out_utility"
JOB = {"num-clients": 3, "clients-per-round": 3, "num-rounds": 3, "partitioner": "iid"}


def federation_scores(keys: dict, out: Path) -> dict:
    """The default run of `keys` in this process; its final test scores."""
    from fedtune.common.config import RunConfig
    from fedtune.simulations.inprocess import federation, metrics, run

    config = RunConfig.from_mapping(keys)
    grid, run_dir = federation(config, out)
    run(grid, config, run_dir)
    last = metrics(out)[-1]
    return {"macro_f1": last["test_macro_f1"], "accuracy": last["test_accuracy"],
            "largest_class_share": last["test_largest_class_share"], "training_mode": config.training_mode}


def probe_ceiling(keys: dict) -> tuple[dict, object]:
    """Logistic regression on the run's own pooled features (train: every client's, test: the run's)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from fedtune.common.tasks.classification import scores_of_logits

    ((train_x, train_y), (test_x, test_y)), splits = pooled_split_features(keys)
    model = LogisticRegression(max_iter=5000).fit(train_x, train_y)
    logits = torch.tensor(model.decision_function(test_x))
    if logits.dim() == 1:  # two classes: scikit-learn gives one margin
        logits = torch.stack([-logits, logits], dim=1)
    scores = scores_of_logits(logits, torch.tensor(np.asarray(test_y)))
    return {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"],
            "largest_class_share": scores["largest_class_share"]}, splits


def pooled_split_features(keys: dict):
    """(train, test) pooled features through the default model's encoder, as the run computes them."""
    from fedtune.common.config import RunConfig
    from fedtune.common.data.labelled import Split
    from fedtune.common.execution import ExecutionProfile
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.models.pooled_classifier import HeadSettings
    from fedtune.common.models.pooled_features import pooled_features
    from fedtune.common.run_data import federated_splits
    from fedtune.common.tasks import get_task, resolve_model_path
    from fedtune.common.tasks.classification import encode

    config = RunConfig.from_mapping({**keys, "training-mode": "probe"})
    splits = federated_splits(config)
    path = resolve_model_path(config.model)
    task = get_task("classification")
    model = task.build_model(model_path=path, num_labels=len(splits.label_names), lora=LoraSettings.from_config(config),
                             seed=config.seed, head=HeadSettings(mode="probe", pooling=config.pooling),
                             profile=ExecutionProfile.from_config(config))
    tokenizer = load_tokenizer(path)

    def features(split: Split):
        x, y = pooled_features(model, encode(tokenizer=tokenizer, split=split, max_length=config.max_length)).tensors
        return x.numpy(), y.numpy()

    pooled = Split(texts=[t for c in splits.clients for t in c.train.texts],
                   labels=[y for c in splits.clients for y in c.train.labels])
    return (features(pooled), features(splits.test)), splits


def adapter_ceiling(keys: dict, splits) -> dict:
    """Centralized, non-private LoRA and head on every client's training records, 3 epochs."""
    from fedtune.client.trainer import train_locally
    from fedtune.common.config import RunConfig
    from fedtune.common.data.labelled import Split
    from fedtune.common.models.classifier import build_lora_classifier
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.tasks import get_task, resolve_model_path
    from fedtune.common.tasks.classification import encode

    config = RunConfig.from_mapping({**keys, "training-mode": "adapter", "lora-variant": "lora", "batch-size": 32,
                                     "learning-rate": 5e-3, "head-learning-rate": 5e-2, "dp": False})
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    pooled = Split(texts=[t for c in splits.clients for t in c.train.texts],
                   labels=[y for c in splits.clients for y in c.train.labels])
    model = build_lora_classifier(model_path=path, num_labels=len(splits.label_names),
                                  lora=LoraSettings.from_config(config), seed=config.seed)
    task = get_task("classification")
    train_locally(model=model, dataset=encode(tokenizer=tokenizer, split=pooled, max_length=config.max_length),
                  loss=task.loss, learning_rate=config.learning_rate, head_learning_rate=config.head_learning_rate,
                  batch_size=config.batch_size, local_epochs=3, max_grad_norm=config.max_grad_norm, plan=None,
                  history=[], seed=config.seed)
    scores = task.evaluate(model=model, dataset=encode(tokenizer=tokenizer, split=splits.test,
                                                       max_length=config.max_length))
    return {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"],
            "largest_class_share": scores["largest_class_share"]}


def dataset_rows(name: str, *, seeds: int, epsilons: list[float], adapter: bool, out: Path,
                 overrides: dict | None = None) -> list[dict]:
    csv = dataset_csv(name)
    job = {**JOB, "data": str(csv), "text-column": "text", "label-column": "label", **(overrides or {})}
    runs: dict[float, list[dict]] = {eps: [] for eps in epsilons}
    ceilings, adapters = [], []
    for seed in range(seeds):
        keys = {**job, "seed": seed}
        started = time.perf_counter()
        ceiling, splits = probe_ceiling(keys)
        ceilings.append(ceiling)
        log(f"{name} seed {seed}: probe ceiling macro-F1 {ceiling['macro_f1']:.3f} ({time.perf_counter() - started:.0f} s)")
        for eps in epsilons:
            scores = federation_scores({**keys, "target-epsilon": eps}, out / f"{name}-eps{eps:g}-seed{seed}")
            runs[eps].append(scores)
            log(f"{name} seed {seed} eps {eps:g}: macro-F1 {scores['macro_f1']:.3f}, "
                f"top class {scores['largest_class_share']:.2f}")
        if adapter and seed == 0:
            adapters.append(adapter_ceiling(keys, splits))
            log(f"{name}: adapter ceiling macro-F1 {adapters[-1]['macro_f1']:.3f}")
    probe_f1 = statistics.mean(c["macro_f1"] for c in ceilings)
    rows = []
    for eps, scores in runs.items():
        rows.append({"dataset": name, "role": DATASETS[name].role, "epsilon": eps,
                     "training_mode": scores[0]["training_mode"],
                     **_spread("macro_f1", [s["macro_f1"] for s in scores]),
                     **_spread("accuracy", [s["accuracy"] for s in scores]),
                     "largest_class_share_max": max(s["largest_class_share"] for s in scores),
                     "probe_ceiling_macro_f1": probe_f1,
                     "probe_ceiling_accuracy": statistics.mean(c["accuracy"] for c in ceilings),
                     "adapter_ceiling_macro_f1": adapters[0]["macro_f1"] if adapters else None,
                     "share_of_probe_ceiling": statistics.mean(s["macro_f1"] for s in scores) / probe_f1})
    return rows


def _spread(name: str, values: list[float]) -> dict:
    return {name: statistics.mean(values), f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{name}_runs": values}


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        adapter = "-" if r["adapter_ceiling_macro_f1"] is None else f"{r['adapter_ceiling_macro_f1']:.3f}"
        rows.append([r["dataset"], r["role"], f"{r['epsilon']:g}", f"{r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f}",
                     f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}", f"{r['largest_class_share_max']:.2f}",
                     f"{r['probe_ceiling_macro_f1']:.3f}", f"{100 * r['share_of_probe_ceiling']:.0f}%", adapter])
    return (f"Machine: {result['machine']}. {result['seeds']} seeds per cell; command: `{result['command']}`.\n\n"
            + markdown_table(["dataset", "role", "target ε", "macro-F1 (default run)", "accuracy",
                              "top class (max)", "probe ceiling macro-F1", "of ceiling", "adapter ceiling macro-F1"],
                             rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--no-adapter-ceiling", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one seed, epsilon 8, no adapter ceiling")
    parser.add_argument("--out", type=Path, default=None, help="where the run directories go (default runs/bench/...)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="a run config key for every run (a candidate default; the result is then not "
                             "published to BENCHMARKS.md)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    seeds, epsilons, adapter = (1, [8.0], False) if args.quick else (args.seeds, args.epsilons,
                                                                     not args.no_adapter_ceiling)
    out = (args.out or default_out()) / NAME
    overrides = dict(item.split("=", 1) for item in args.overrides)
    trial = args.quick or bool(overrides)  # only the defaults' own figures land in BENCHMARKS.md
    rows = []
    for name in args.datasets:
        rows += dataset_rows(name, seeds=seeds, epsilons=epsilons, adapter=adapter, out=out, overrides=overrides)
        result = {"machine": machine(), "seeds": seeds, "rows": rows, "overrides": overrides,
                  "command": "python -m benchmarks.held_out_utility " + " ".join(sys.argv[1:])}
        write_result(NAME, result, quick=trial)
    publish(NAME, render(result), quick=trial)


if __name__ == "__main__":
    main()
