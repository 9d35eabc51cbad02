"""fedtune's SecAgg+ round against the same round at another commit, side by side on this machine.

    git worktree add /tmp/base 51fb50a
    python -m benchmarks.secagg_vs_commit --base /tmp/base [--clients 20] [--repeats 2]

The secagg-cost benchmark's tiny job (benchmarks/secagg_cost.py: tiny BERT, BBC News, DP-SGD, 6
rounds, every client sampled), run in turn by this checkout with SecAgg+, by the base checkout with
SecAgg+ and by this checkout with plain FedAvg, `--repeats` times; each `fedtune simulate` imports
the code of the tree it runs in. Seconds: mean of rounds 2 to the last. For a change to the
protocol this is the ratio that matters: a plain round's time moves with the machine's load, and
the SecAgg+ messages cost a fixed few seconds a round in Flower's simulation engine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import OFFLINE_ENV, ROOT, log
from benchmarks.tiny_model import save_tiny_bert, steady_round_seconds


def run_once(tree: Path, keys: dict, out: Path) -> float:
    args = [sys.executable, "-m", "fedtune", "simulate", "--out", str(out)]
    for key, value in keys.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    subprocess.run(args, cwd=tree, env=dict(os.environ, **OFFLINE_ENV), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return steady_round_seconds(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = {"model": str(save_tiny_bert(Path(tmp) / "tiny")), "data": "bbc-news", "max-length": 32,
                "num-rounds": 6, "dp": True, "lora-rank": 4, "lora-variant": "lora", "training-mode": "adapter",
                "num-clients": args.clients, "clients-per-round": args.clients}
        for repeat in range(args.repeats):
            for label, tree, secagg in (("this SecAgg+", ROOT, True), ("base SecAgg+", args.base, True),
                                        ("this plain", ROOT, False)):
                out = Path(tmp) / f"{label.replace(' ', '-')}-{repeat}"
                seconds.setdefault(label, []).append(run_once(tree, {**keys, "secure-aggregation": secagg}, out))
                log(f"{label}, repeat {repeat + 1}: {seconds[label][-1]:.2f} s / round")
    mean = {label: sum(values) / len(values) for label, values in seconds.items()}
    print(json.dumps({"clients": args.clients, "seconds_per_round": mean, "runs": seconds,
                      "this / base SecAgg+": mean["this SecAgg+"] / mean["base SecAgg+"],
                      "this SecAgg+ / plain": mean["this SecAgg+"] / mean["this plain"]}, indent=2))


if __name__ == "__main__":
    main()
