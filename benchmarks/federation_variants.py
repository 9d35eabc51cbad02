"""Side-by-side runs of the demo federation: DP/no-DP x SecAgg+/plain, in one invocation.

    python -m benchmarks.federation_variants [--quick] [--out DIR]

Each variant is a real `fedtune simulate` in its own process (its own Ray instance), one after
another on the same machine, so their seconds can be compared. Writes the results as JSON to
benchmarks/results/ and regenerates their table in BENCHMARKS.md (no hand-copied numbers).
--quick shrinks the job (3 clients, 2 rounds, max length 32) to a few minutes.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.harness import default_out, machine, publish, simulate, write_result

VARIANTS = {
    "DP-SGD + SecAgg+ (demo)": {"dp": "true", "secure-aggregation": "true"},
    "DP-SGD + plain FedAvg": {"dp": "true", "secure-aggregation": "false"},
    "no DP + SecAgg+": {"dp": "false", "secure-aggregation": "true"},
    "no DP + plain FedAvg": {"dp": "false", "secure-aggregation": "false"},
}
QUICK = {"num-clients": "3", "clients-per-round": "3", "num-rounds": "2", "max-length": "32"}


def run_variant(name: str, keys: dict[str, str], out: Path) -> dict:
    run = simulate(keys, out=out, label=name)
    return {
        "variant": name,
        "test_accuracy": run.summary["test_accuracy"],
        "test_macro_f1": run.summary["test_macro_f1"],
        "max_epsilon": run.max_epsilon,
        "seconds": run.summary["seconds"],
        "mean_round_seconds": run.mean_round_seconds,
        "bytes_up_per_client": run.rounds[-1]["bytes_up_per_client"],
    }


def render(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]["seconds"]
    lines = [f"Machine: {result['machine']}. Job: {result['job']}. Command: `{result['command']}`.", "",
             "| variant | test accuracy | macro-F1 | max ε | total s | mean round s | vs demo | bytes up / client / round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.3f}"
        lines.append(f"| {r['variant']} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | {eps} "
                     f"| {r['seconds']:.0f} | {r['mean_round_seconds']:.1f} | {r['seconds'] / base:.2f}x "
                     f"| {r['bytes_up_per_client']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=default_out(), help="default runs/bench/<timestamp>")
    args = parser.parse_args()
    out = args.out
    extra = QUICK if args.quick else {}
    rows = [run_variant(name, {**keys, **extra}, out / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower())
            for name, keys in VARIANTS.items()]
    result = {"job": "quick (3 clients, 2 rounds, max-length 32)" if args.quick else "demo defaults",
              "command": "python -m benchmarks.federation_variants" + (" --quick" if args.quick else ""), "rows": rows}
    write_result("federation_variants", result, quick=args.quick)
    publish("federation-variants", render({**result, "machine": machine()}), quick=args.quick)


if __name__ == "__main__":
    main()
