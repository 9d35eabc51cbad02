"""What privacy costs in accuracy: BBC News over 5 clients at epsilon 1, 3, 8 and without DP.

    python -m benchmarks.utility [--quick] [--seeds N] [--modes MODE ...] [--epsilons E ...]
                                [--max-length N]

Every federation is the real ServerApp and ClientApp (MiniLM, 5 clients, all sampled, 3 rounds,
max-length 64), run in one process by benchmarks/inprocess_federation.py (no Ray start-up: dozens
of runs), for IID and Dirichlet(0.5) partitions and four ways to train: the adapter with LoRA or
FFA-LoRA (training-mode adapter), the head alone over the model's pooled features (probe), and
two-stage (one probe round, then FFA-LoRA from that head). Plain FedAvg stands in for SecAgg+,
which gives the same aggregate up to fixed-point rounding (tests/test_simulation.py) at a few
percent more time. Results are written after every cell, so a run cut short keeps what it measured
and `--modes` can add the rest later (rows of other modes are kept). `--max-length 128` measures the
chosen modes at the product's default truncation instead, `--epsilons 1 3` only some budgets (rows
are kept per cell: partition, mode, budget and max-length).
Two baselines train in this process with the clients' own training code
(`client.trainer.train_locally`) on the same test split:
- centralized: all clients' training data pooled, non-private LoRA, 3 epochs;
- one client alone: client 0's own data under each partition, without DP and at epsilon 8
  over 3 epochs (the same number of DP steps as its 3 federated rounds).
DP noise is fresh from the OS in every run; `--seeds N` repeats each federation with seeds
0..N-1 (splits, sampling and initialisation change too) and reports mean and spread; the
baselines run once, with seed 0's split.
--quick: IID, LoRA, epsilon 8 and no DP, max-length 32, one round, no baselines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

from benchmarks.inprocess_federation import MODULE
from benchmarks.harness import (RESULTS, default_out, log, machine, markdown_table, publish, read_result, simulate,
                                write_result)

NAME = "utility"
EPSILONS = (1.0, 3.0, 8.0, None)  # None: no DP
PARTITIONERS = ("iid", "dirichlet")
MODES = ("probe", "two-stage", "ffa", "lora")  # cheapest first
JOB = {"num-clients": 5, "clients-per-round": 5, "num-rounds": 3, "local-epochs": 1, "max-length": 64,
       "secure-aggregation": False, "dirichlet-alpha": 0.5}
QUICK_JOB = {**JOB, "num-rounds": 1, "max-length": 32}
# Each variant with the settings that scored best on validation (benchmarks/tune_defaults.py),
# spelled out so the benchmark does not move when the defaults do. FFA-LoRA's B alone must move
# further than LoRA's A and B together.
TRAINING = {"batch-size": 32, "max-grad-norm": 1.0, "head-learning-rate": 1e-1}
VARIANT_KEYS = {"lora": {**TRAINING, "training-mode": "adapter", "lora-variant": "lora", "learning-rate": 1e-2},
                "ffa": {**TRAINING, "training-mode": "adapter", "lora-variant": "ffa", "learning-rate": 5e-2,
                        "batch-size": 64}}
# Probing: 16 full-batch SGD steps a round on the head from the label-name prior, step 2 at epsilon
# 1 and 5 above (measured on frozen features, 3 seeds; common/privacy/budget_defaults.py).
PROBE_KEYS = {"probe-steps": 16, "head-prior": True, "pooling": "mean"}
VARIANT_KEYS["probe"] = {**PROBE_KEYS, "training-mode": "probe"}
VARIANT_KEYS["two-stage"] = {**VARIANT_KEYS["ffa"], **PROBE_KEYS, "training-mode": "two-stage", "probe-rounds": 1,
                             "probe-epsilon-share": 0.5}


def mode_keys(mode: str, epsilon: float | None) -> dict:
    keys = dict(VARIANT_KEYS[mode])
    if mode in ("probe", "two-stage"):
        keys["probe-learning-rate"] = 2.0 if epsilon is not None and epsilon <= 1.0 else 5.0
    return keys
# The baselines are plain LoRA. Without DP they take the smaller steps non-private training has
# always used here (with the DP-tuned 1e-2 / 1e-1, 160 centralized steps reached only 0.78);
# the one-client epsilon-8 baseline takes the DP-tuned LoRA settings.
BASELINE_KEYS = {None: {**TRAINING, "lora-variant": "lora", "learning-rate": 5e-3, "head-learning-rate": 5e-2},
                 8.0: VARIANT_KEYS["lora"]}


def federation_rows(*, job: dict, cells: list[tuple[str, str, float | None]], seeds: int, out: Path,
                    save: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    rows = []
    for partitioner, variant, epsilon in cells:
        runs = []
        for seed in range(seeds):
            keys = {**job, **mode_keys(variant, epsilon), "partitioner": partitioner, "seed": seed,
                    "dp": epsilon is not None, **({"target-epsilon": epsilon} if epsilon is not None else {})}
            label = f"{partitioner} {variant} eps={epsilon or 'no DP'} seed {seed}"
            runs.append(simulate(keys, out=out / label.replace(" ", "-").replace("=", ""), label=label,
                                 module=MODULE))
        rows.append({"kind": "federation", "partitioner": partitioner, "variant": variant, "epsilon": epsilon,
                     "max_length": job["max-length"],
                     **_spread("accuracy", [r.summary["test_accuracy"] for r in runs]),
                     **_spread("macro_f1", [r.summary["test_macro_f1"] for r in runs]),
                     "max_epsilon": max((r.max_epsilon or 0.0) for r in runs) if epsilon else None,
                     "mean_round_seconds": statistics.mean(r.mean_round_seconds for r in runs)})
        save(rows)
    return rows


def _spread(name: str, values: list[float]) -> dict:
    return {name: statistics.mean(values), f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{name}_runs": values}


def baseline_rows(*, job: dict) -> list[dict]:
    """Centralized non-private LoRA, and client 0 alone (no DP, epsilon 8), on the same test split."""
    import torch

    from fedtune.client.trainer import train_locally
    from fedtune.common.config import RunConfig
    from fedtune.common.data.labelled import Split
    from fedtune.common.models.classifier import build_lora_classifier
    from fedtune.common.models.loading import load_tokenizer
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.tasks import resolve_model_path
    from fedtune.common.privacy.plan import plan_privacy
    from fedtune.common.run_data import federated_splits
    from fedtune.common.tasks import get_task
    from fedtune.common.tasks.classification import encode

    torch.set_num_threads(2)
    config = RunConfig.from_mapping({**job, **BASELINE_KEYS[None]})
    epochs = config.num_rounds * config.local_epochs
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    by_partitioner = {p: federated_splits(config.with_overrides(partitioner=p)) for p in PARTITIONERS}
    splits = by_partitioner["iid"]  # the test split and the pooled data do not depend on the partitioner
    test = encode(tokenizer=tokenizer, split=splits.test, max_length=config.max_length)
    pooled = Split(texts=[t for c in splits.clients for t in c.train.texts],
                   labels=[y for c in splits.clients for y in c.train.labels])
    cases = [("centralized, all data, no DP", pooled, None)]
    for partitioner, part in by_partitioner.items():
        cases += [(f"client 0 alone ({partitioner}), no DP", part.clients[0].train, None),
                  (f"client 0 alone ({partitioner}), epsilon 8", part.clients[0].train, 8.0)]
    rows = []
    for name, split, epsilon in cases:
        config = RunConfig.from_mapping({**job, **BASELINE_KEYS[epsilon]})
        log(f"baseline: {name} ({len(split)} training examples, {epochs} epochs)")
        started = time.perf_counter()
        model = build_lora_classifier(model_path=resolve_model_path(config.model), num_labels=len(splits.label_names),
                                      lora=LoraSettings.from_config(config), seed=config.seed)
        train = encode(tokenizer=tokenizer, split=split, max_length=config.max_length)
        plan = None if epsilon is None else plan_privacy(
            num_examples=len(train), batch_size=config.batch_size, local_epochs=epochs, num_rounds=1,
            target_epsilon=epsilon, target_delta=config.target_delta, accountant=config.accountant)
        train_locally(model=model, dataset=train, loss=get_task("classification").loss, learning_rate=config.learning_rate,
                      head_learning_rate=config.head_learning_rate, batch_size=config.batch_size,
                      local_epochs=epochs, max_grad_norm=config.max_grad_norm, plan=plan, history=[], seed=config.seed)
        scores = get_task("classification").evaluate(model=model, dataset=test)
        rows.append({"kind": "baseline", "baseline": name, "epsilon": epsilon, "examples": len(split),
                     "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                     "seconds": time.perf_counter() - started})
    return rows


def render(result: dict) -> str:
    seeds = result["seeds"]
    fmt = (lambda r, k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}") if seeds > 1 else (lambda r, k: f"{r[k]:.3f}")
    rows = []
    for r in sorted(result["rows"], key=_table_order):
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        if r["kind"] == "federation":
            spent = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}"
            setting = f"federation, {r['partitioner']}, {r['variant']}, len {_max_length(r)}"
            rows.append([setting, eps, fmt(r, "accuracy"), fmt(r, "macro_f1"), spent, f"{r['mean_round_seconds']:.0f}"])
        else:
            rows.append([f"baseline: {r['baseline']}", eps, f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}", "-", "-"])
    seeds_text = f"mean ± std over {seeds} seeds" if seeds > 1 else "one run per cell"
    return (f"Machine: {result['machine']}. Job: {result['job_text']}; {seeds_text}. "
            f"Command: `{result['command']}`.\n\n"
            + markdown_table(["setting", "target ε", "test accuracy", "test macro-F1", "spent ε (max client)",
                              "s / round"], rows)
            + f"\n\n![Test accuracy against epsilon]({result['plot']})")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = {1.0: 0, 3.0: 1, 8.0: 2, None: 3}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines = sorted({(r["variant"], _max_length(r)) for r in result["rows"] if r["kind"] == "federation"},
                   key=lambda line: (MODES.index(line[0]), line[1]))
    for partitioner in PARTITIONERS:
        for variant, max_length in lines:
            cells = [r for r in result["rows"] if r["kind"] == "federation" and r["partitioner"] == partitioner
                     and r["variant"] == variant and _max_length(r) == max_length]
            if not cells:
                continue
            cells.sort(key=lambda r: positions[r["epsilon"]])
            ax.errorbar([positions[r["epsilon"]] for r in cells], [r["accuracy"] for r in cells],
                        yerr=[r["accuracy_std"] for r in cells], marker="o", capsize=3,
                        linestyle="-" if partitioner == "iid" else "--",
                        label=f"{variant} len {max_length}, {partitioner}")
    for r in result["rows"]:
        if r["kind"] == "baseline":
            color = "black" if r["baseline"].startswith("centralized") else (
                "tab:red" if r["epsilon"] else "grey")
            style = ":" if "dirichlet" in r["baseline"] else "-."
            ax.axhline(r["accuracy"], color=color, linestyle=style, linewidth=1, label=r["baseline"])
    ax.set_xticks(range(4), ["ε = 1", "ε = 3", "ε = 8", "no DP"])
    ax.set_ylabel("test accuracy")
    ax.set_title("BBC News, 5 clients: accuracy against the privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES),
                        help="measure these modes; the saved rows of the others are kept")
    parser.add_argument("--epsilons", nargs="*", choices=["1", "3", "8", "none"], default=["1", "3", "8", "none"],
                        help="measure these budgets only; the saved rows of the others are kept")
    parser.add_argument("--max-length", type=int, default=JOB["max-length"],
                        help="truncate every text to this many tokens (rows are kept per max-length)")
    parser.add_argument("--only-baselines", action="store_true",
                        help="recompute the baselines into the existing results, keep the federations")
    parser.add_argument("--out", type=Path, default=default_out())
    args = parser.parse_args()
    if args.quick:
        job, cells = QUICK_JOB, [("iid", m, e) for m in ("probe", "lora") for e in (8.0, None)]
    else:
        job = {**JOB, "max-length": args.max_length}
        epsilons = [None if e == "none" else float(e) for e in args.epsilons]
        cells = [(p, m, e) for m in args.modes for p in PARTITIONERS for e in EPSILONS if e in epsilons]
    measured = set() if args.only_baselines else {(p, m, e, job["max-length"]) for p, m, e in cells}
    kept = _kept_rows(quick=args.quick, seeds=args.seeds, measured=measured)
    result = {"job": job, "seeds": args.seeds, "plot": f"benchmarks/results/utility{'_quick' if args.quick else ''}.png",
              "job_text": f"MiniLM, BBC News, {job['num-clients']} clients all sampled, {job['num-rounds']} rounds, "
                          f"max-length as in each row (len), delta 1e-5, plain FedAvg, in one process",
              "command": "make bench-quick" if args.quick else "make bench"}
    baselines = [r for r in kept if r["kind"] == "baseline"]
    federations = [r for r in kept if r["kind"] == "federation"]

    def save(rows: list[dict]) -> None:  # after every cell: a run cut short keeps what it measured
        write_result(NAME, {**result, "rows": federations + rows + baselines}, quick=args.quick)

    if not args.only_baselines:
        federations += federation_rows(job=job, cells=cells, seeds=args.seeds, out=args.out / "utility", save=save)
    if not args.quick and (args.only_baselines or not baselines):
        baselines = baseline_rows(job=job)
    result["rows"] = federations + baselines
    write_result(NAME, result, quick=args.quick)
    plot(result, RESULTS / Path(result["plot"]).name)
    publish(NAME, render({**result, "machine": machine()}), quick=args.quick)


def _table_order(row: dict) -> tuple:
    """Federations by mode, max-length, partition and budget; the baselines last, as measured."""
    if row["kind"] != "federation":
        return (len(MODES),)
    return (MODES.index(row["variant"]), _max_length(row), PARTITIONERS.index(row["partitioner"]),
            EPSILONS.index(row["epsilon"]))


def _max_length(row: dict) -> int:
    return row.get("max_length", JOB["max-length"])  # rows saved before the key existed used the job's 64


def _kept_rows(*, quick: bool, seeds: int, measured: set[tuple]) -> list[dict]:
    """Rows of the saved result this run does not remeasure (same seeds only)."""
    try:
        previous = read_result(NAME, quick=quick)
    except (OSError, ValueError):
        return []
    if previous.get("seeds") != seeds:
        return [r for r in previous["rows"] if r["kind"] == "baseline"]
    return [r for r in previous["rows"] if r["kind"] == "baseline"
            or (r["partitioner"], r["variant"], r["epsilon"], _max_length(r)) not in measured]


if __name__ == "__main__":
    main()
