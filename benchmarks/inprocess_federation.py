"""A federation in one process (simulations/inprocess.py) for benchmarks that run dozens of them.

    python -m benchmarks.inprocess_federation run --out DIR [--set key=value ...]

The same ServerApp round loop and ClientApp as `fedtune simulate`, every message serialized as
Flower serializes it, clients one after another in this process: no Ray start-up (about 20 s a
run) and one base-model load. It writes the same run directory (summary.json, metrics.jsonl,
ledgers, adapter), so `benchmarks.harness.simulate(..., module=MODULE)` reads it like any run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MODULE = ("benchmarks.inprocess_federation", "run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    import torch

    from fedtune.common.config import RunConfig
    from fedtune.simulations.inprocess import federation, run

    torch.set_num_threads(os.cpu_count() or 1)
    config = RunConfig.load(overrides=args.overrides)
    grid, run_dir = federation(config, args.out)
    run(grid, config, run_dir)


if __name__ == "__main__":
    main()
