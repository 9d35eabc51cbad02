"""How the defaults were chosen: candidate settings scored on the clients' validation split.

    python -m benchmarks.tune_defaults [--only NAME ...]

Each candidate is a real `fedtune simulate` of the utility benchmark's federation (BBC News,
5 IID clients, 3 rounds, epsilon 8, max-length 64) with `fraction-evaluate = 1`, so every client
scores the global adapter on its own validation examples after each round. The choice uses
that validation accuracy only; test scores are never read here. Results accumulate in
benchmarks/results/tuning.json (a rerun of one candidate replaces its row), and the table in
BENCHMARKS.md is regenerated from it. Not part of `make bench`: it is a one-off search.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.harness import RESULTS, ROOT, log, markdown_table, publish, simulate, write_result

# The utility benchmark's federation, at the privacy level the goal is stated for.
BASE = {"num-clients": 5, "clients-per-round": 5, "num-rounds": 3, "max-length": 64, "dp": True,
        "target-epsilon": 8.0, "secure-aggregation": False, "fraction-evaluate": 1.0, "partitioner": "iid",
        "training-mode": "adapter"}

# name -> overrides of BASE; the first row is the defaults before tuning.
CANDIDATES: dict[str, dict[str, object]] = {
    "old defaults (batch 32, lr 5e-3, head 5e-2, C 1)": {"batch-size": 32, "learning-rate": 5e-3,
                                                         "head-learning-rate": 5e-2, "max-grad-norm": 1.0},
    "batch 64": {"batch-size": 64, "learning-rate": 5e-3, "head-learning-rate": 5e-2},
    "batch 64, head lr 1e-1": {"batch-size": 64, "learning-rate": 5e-3, "head-learning-rate": 1e-1},
    "batch 128, lr 1e-2, head lr 1e-1": {"batch-size": 128, "learning-rate": 1e-2, "head-learning-rate": 1e-1},
    "smaller steps: lr 2e-3, head lr 2e-2": {"batch-size": 32, "learning-rate": 2e-3, "head-learning-rate": 2e-2},
    "larger steps: lr 1e-2, head lr 1e-1": {"batch-size": 32, "learning-rate": 1e-2, "head-learning-rate": 1e-1},
    "larger steps: lr 2e-2, head lr 2e-1": {"batch-size": 32, "learning-rate": 2e-2, "head-learning-rate": 2e-1},
    "C 0.1": {"batch-size": 32, "learning-rate": 5e-3, "head-learning-rate": 5e-2, "max-grad-norm": 0.1},
    "2 local epochs": {"batch-size": 32, "learning-rate": 5e-3, "head-learning-rate": 5e-2, "local-epochs": 2},
    "ffa, lr 2e-2": {"lora-variant": "ffa", "batch-size": 32, "learning-rate": 2e-2, "head-learning-rate": 5e-2},
    "ffa, lr 5e-2, head lr 1e-1": {"lora-variant": "ffa", "batch-size": 32, "learning-rate": 5e-2,
                                   "head-learning-rate": 1e-1},
    "ffa, lr 1e-1, head lr 2e-1": {"lora-variant": "ffa", "batch-size": 32, "learning-rate": 1e-1,
                                   "head-learning-rate": 2e-1},
    "ffa, lr 5e-2, head lr 1e-1, batch 64": {"lora-variant": "ffa", "batch-size": 64, "learning-rate": 5e-2,
                                             "head-learning-rate": 1e-1},
}
NAME = "tuning"


def render(rows: list[dict]) -> str:
    table = [[r["candidate"], f"{r['validation_accuracy']:.3f}", f"{r['max_epsilon']:.2f}",
              f"{r['mean_round_seconds']:.0f}"] for r in rows]
    return ("Job: BBC News, 5 IID clients, 3 rounds, max-length 64, epsilon 8, one run each. "
            "Command: `python -m benchmarks.tune_defaults`.\n\n"
            + markdown_table(["candidate", "validation accuracy (mean of clients)", "max ε", "s / round"], table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="candidate names to (re)run; default all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "tune" / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    existing = RESULTS / f"{NAME}.json"
    rows = json.loads(existing.read_text())["rows"] if existing.exists() else []
    for index, (name, overrides) in enumerate(CANDIDATES.items()):
        if args.only and name not in args.only:
            continue
        run = simulate({**BASE, **overrides}, out=args.out / f"candidate-{index}", label=name)
        row = {"candidate": name, "overrides": overrides, "validation_accuracy": run.mean_validation_accuracy(),
               "max_epsilon": run.max_epsilon, "mean_round_seconds": run.mean_round_seconds}
        rows = [r for r in rows if r["candidate"] != name] + [row]
        rows.sort(key=lambda r: list(CANDIDATES).index(r["candidate"]) if r["candidate"] in CANDIDATES else 99)
        write_result(NAME, {"base": BASE, "rows": rows}, quick=False)
        log(f"{name}: validation accuracy {row['validation_accuracy']:.3f}")
    publish(NAME, render(rows), quick=False)


if __name__ == "__main__":
    main()
