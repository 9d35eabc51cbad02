"""`make bench`: every benchmark, one after another, on this machine (about 2 hours).

    python -m benchmarks.run_all [--quick] [--only NAME ...]

Each benchmark runs in its own process and writes benchmarks/results/<name>.json (plus PNG
plots) and its table in BENCHMARKS.md; --quick writes <name>_quick.json and only prints its
tables, so quick numbers never replace measured ones. One benchmark failing does not stop the
others; the exit status says whether all passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks.harness import OFFLINE_ENV, ROOT, default_out, log

BENCHMARKS = ("dp_overhead", "communication", "secagg_cost", "scale", "utility", "mechanism_check", "cli_latency",
              "deployment_latency", "execution_profile", "quantized_memory", "held_out_utility")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes in all")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS)
    args = parser.parse_args()
    out = default_out()
    started = time.perf_counter()
    failed = []
    for name in args.only or BENCHMARKS:
        command = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else [])]
        if name not in ("dp_overhead", "communication", "mechanism_check", "quantized_memory"):
            command += ["--out", str(out)]
        log(f"benchmark {name} ...")
        begun = time.perf_counter()
        if subprocess.run(command, cwd=ROOT, env=dict(os.environ, **OFFLINE_ENV)).returncode != 0:
            failed.append(name)
        log(f"benchmark {name}: {time.perf_counter() - begun:.0f} s")
    log(f"all benchmarks: {(time.perf_counter() - started) / 60:.1f} min"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
