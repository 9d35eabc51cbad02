"""How long the commands a person waits on take: `fedtune plan`, `--help`, and the audit (with its
report) of a run of the default job.

    python -m benchmarks.cli_latency [--quick] [--out DIR] [--run RUN_DIR]

Each command runs in a fresh process, as a user starts it, three times; the table gives the
median wall time. Without --run it first simulates the default job (about 4 minutes; --quick
uses 2 clients and 1 round) to have a run to audit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import OFFLINE_ENV, ROOT, default_out, log, machine, markdown_table, publish, simulate, \
    write_result

REPEATS = 3


def timed(args: list[str], *, cwd: Path) -> float:
    """Median wall seconds of `python -m fedtune ARGS` over REPEATS fresh processes."""
    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fedtune", *args], cwd=cwd, capture_output=True, text=True,
                              env=dict(os.environ, **OFFLINE_ENV))
        seconds.append(time.perf_counter() - started)
        if done.returncode not in (0, 1, 2, 3):
            raise RuntimeError(f"fedtune {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--run", type=Path, default=None, help="audit this run instead of simulating one")
    args = parser.parse_args()
    run_dir = args.run
    if run_dir is None:
        out = (args.out or default_out()) / "cli_latency"
        keys = {"num-clients": 2, "num-rounds": 1} if args.quick else {}
        run_dir = simulate(keys, out=out / "default-run", label="default job").out
    report_dir = Path(run_dir).parent / "cli-latency-report"
    commands = {
        "fedtune --help": ["--help"],
        "fedtune plan --dataset-size 1000 --target-epsilon 0 (refused)": ["plan", "--dataset-size", "1000",
                                                                           "--target-epsilon", "0"],
        "fedtune plan --dataset-size 1000 (calibrates sigma)": ["plan", "--dataset-size", "1000"],
        "fedtune plan --dataset-size 200 --rounds 10 --target-epsilon 1": ["plan", "--dataset-size", "200",
                                                                           "--rounds", "10", "--target-epsilon", "1"],
        "fedtune audit RUN": ["audit", str(run_dir)],
        "fedtune audit RUN --report --out DIR": ["audit", str(run_dir), "--report", "--out", str(report_dir)],
    }
    rows = []
    for label, command in commands.items():
        median = timed(command, cwd=ROOT)
        log(f"{label}: {median:.2f} s")
        rows.append([label, f"{median:.2f}"])
    write_result("cli_latency", {"run": str(run_dir), "median_seconds": {r[0]: float(r[1]) for r in rows}},
                 quick=args.quick)
    table = markdown_table(["command (fresh process)", f"median of {REPEATS} (s)"], rows)
    publish("cli_latency", f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n\n{table}", quick=args.quick)


if __name__ == "__main__":
    main()
