"""Side-by-side runs of the demo federation: DP/no-DP x SecAgg+/plain, in one invocation.

    python -m benchmarks.federation_variants [--quick] [--out DIR]

Each variant is a real `fedtune simulate` in its own process (its own Ray instance), one after
another on the same machine, so their seconds can be compared. Writes the results as JSON to
benchmarks/results/ and regenerates their table in BENCHMARKS.md (no hand-copied numbers).
--quick shrinks the job (3 clients, 2 rounds, max length 32) to a few minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "DP-SGD + SecAgg+ (demo)": {"dp": "true", "secure-aggregation": "true"},
    "DP-SGD + plain FedAvg": {"dp": "true", "secure-aggregation": "false"},
    "no DP + SecAgg+": {"dp": "false", "secure-aggregation": "true"},
    "no DP + plain FedAvg": {"dp": "false", "secure-aggregation": "false"},
}
RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
BEGIN, END = "<!-- federation-variants:begin -->", "<!-- federation-variants:end -->"
QUICK = {"num-clients": "3", "clients-per-round": "3", "num-rounds": "2", "max-length": "32"}


def run_variant(name: str, keys: dict[str, str], out: Path) -> dict:
    args = [sys.executable, "-m", "common.cli", "simulate", "--out", str(out)]
    for key, value in keys.items():
        args += ["--set", f"{key}={value}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print(f"running {name} ...", file=sys.stderr, flush=True)
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epsilons = [e for e in summary["epsilon"].values() if e is not None]
    return {
        "variant": name,
        "test_accuracy": summary["test_accuracy"],
        "test_macro_f1": summary["test_macro_f1"],
        "max_epsilon": max(epsilons) if epsilons else None,
        "seconds": summary["seconds"],
        "mean_round_seconds": sum(r["seconds"] for r in rounds) / len(rounds),
        "bytes_up_per_client": rounds[-1]["bytes_up_per_client"],
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


def update_benchmarks_md(table: str, *, begin: str = BEGIN, end: str = END) -> None:
    """Replace a generated block in BENCHMARKS.md (the prose around it is written by hand);
    a block not there yet is appended."""
    text = BENCHMARKS_MD.read_text(encoding="utf-8") if BENCHMARKS_MD.exists() else ""
    block = f"{begin}\n{table}\n{end}"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    BENCHMARKS_MD.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="default runs/bench/<timestamp>")
    args = parser.parse_args()
    out = args.out or Path("runs/bench") / time.strftime("%Y%m%d-%H%M%S")
    extra = QUICK if args.quick else {}
    rows = [run_variant(name, {**keys, **extra}, out / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower())
            for name, keys in VARIANTS.items()]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
              "job": "quick (3 clients, 2 rounds, max-length 32)" if args.quick else "demo defaults",
              "command": "make bench-quick" if args.quick else "make bench", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    name = "federation_variants_quick.json" if args.quick else "federation_variants.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    if not args.quick:
        update_benchmarks_md(table)
    print(table)


if __name__ == "__main__":
    main()
