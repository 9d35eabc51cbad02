"""How the simulation grows with the federation: 10, 50 and 100 clients, 10 sampled per round.

    python -m benchmarks.scale [--quick]

Real `fedtune simulate` runs of the tiny model on BBC News with the product's defaults (DP-SGD,
SecAgg+), 10 clients sampled each round. Reports seconds per round and the peak resident
memory of the whole simulation: the coordinator, Ray and its workers, PSS summed over the
process tree (shared pages counted once) and sampled every half second. The data is split over
all clients, so more clients means fewer examples each. --quick: 10 and 20 clients.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.harness import RESULTS, default_out, line_plot, machine, markdown_table, publish, simulate, write_result
from benchmarks.tiny_model import steady_round_seconds, tiny_job

NAME = "scale"
SAMPLED = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=default_out())
    args = parser.parse_args()
    sizes = (10, 20) if args.quick else (10, 50, 100)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        job = tiny_job(Path(tmp) / "tiny-bert")
        for clients in sizes:
            run = simulate({**job, "num-clients": clients, "clients-per-round": SAMPLED, "secure-aggregation": True},
                           out=args.out / f"scale-{clients}", label=f"{clients} clients, {SAMPLED} sampled")
            examples = [c["num_examples"] for r in run.rounds for c in r["clients"].values()]
            rows.append({"clients": clients, "mean_round_seconds": steady_round_seconds(run.rounds),
                         "rounds": [r["seconds"] for r in run.rounds], "wall_seconds": run.wall_seconds,
                         "peak_pss_gib": run.peak_pss_gib,
                         "mean_client_examples": sum(examples) / len(examples)})
    result = {"rows": rows, "job": f"tiny BERT, BBC News, max-length 32, LoRA r=4, DP-SGD + SecAgg+, 3 rounds "
                                   f"(seconds: mean of rounds 2-3), "
                                   f"{SAMPLED} clients sampled per round",
              "command": "make bench-quick" if args.quick else "make bench"}
    write_result(NAME, result, quick=args.quick)
    png = RESULTS / f"{NAME}{'_quick' if args.quick else ''}.png"
    line_plot(png, x=[r["clients"] for r in rows],
              series={"seconds per round": [r["mean_round_seconds"] for r in rows],
                      "peak memory (GiB x 10)": [10 * r["peak_pss_gib"] for r in rows]},
              xlabel=f"clients in the federation ({SAMPLED} sampled per round)", ylabel="seconds; GiB x 10",
              title="Cost of a simulated federation against its size")
    table = markdown_table(
        ["clients", "training examples per client", "s / round", "whole run s", "peak memory of the simulation (GiB, PSS)"],
        [[r["clients"], f"{r['mean_client_examples']:.0f}", f"{r['mean_round_seconds']:.2f}",
          f"{r['wall_seconds']:.0f}", f"{r['peak_pss_gib']:.2f}"] for r in rows])
    publish(NAME, f"Machine: {machine()}. Job: {result['job']}. Command: `{result['command']}`.\n\n{table}"
            f"\n\n![Cost against clients](benchmarks/results/{png.name})",
            quick=args.quick)


if __name__ == "__main__":
    main()
