"""What SecAgg+ adds to a round, as the federation grows: 5, 10 and 20 clients, all sampled.

    python -m benchmarks.secagg_cost [--quick]

Each point is two real `fedtune simulate` runs of the tiny model on BBC News (DP-SGD on, 3
rounds), one with SecAgg+ and one with plain FedAvg, one after the other. On a tiny model the
local training is cheap, so the protocol's share of a round (key agreement, secret sharing,
masking, unmasking) shows instead of hiding behind the backbone. Round 1 (start-up, privacy
calibration) is left out of the mean; the two runs of a point alternate which goes first.
--quick: 5 clients only.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.harness import RESULTS, default_out, line_plot, machine, markdown_table, publish, simulate, write_result
from benchmarks.tiny_model import steady_round_seconds, tiny_job

NAME = "secagg_cost"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=default_out())
    args = parser.parse_args()
    sizes = (5,) if args.quick else (5, 10, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        job = tiny_job(Path(tmp) / "tiny-bert")
        for clients in sizes:
            row = {"clients": clients}
            # Alternate which goes first, so neither always meets colder caches.
            for secure in ((True, False) if len(rows) % 2 == 0 else (False, True)):
                kind = "secagg" if secure else "plain"
                run = simulate({**job, "num-clients": clients, "clients-per-round": clients,
                                "secure-aggregation": secure},
                               out=args.out / f"secagg-cost-{clients}-{kind}", label=f"{clients} clients, {kind}")
                row[f"{kind}_round_seconds"] = steady_round_seconds(run.rounds)
                row[f"{kind}_rounds"] = [r["seconds"] for r in run.rounds]
            row["ratio"] = row["secagg_round_seconds"] / row["plain_round_seconds"]
            rows.append(row)
    result = {"rows": rows, "job": "tiny BERT (2 layers, 32 wide), BBC News, max-length 32, LoRA r=4, DP-SGD, 3 rounds "
                                   "(seconds: mean of rounds 2-3), every client sampled",
              "command": "make bench-quick" if args.quick else "make bench"}
    write_result(NAME, result, quick=args.quick)
    png = RESULTS / f"{NAME}{'_quick' if args.quick else ''}.png"
    line_plot(png, x=[r["clients"] for r in rows],
              series={"plain FedAvg": [r["plain_round_seconds"] for r in rows],
                      "SecAgg+": [r["secagg_round_seconds"] for r in rows]},
              xlabel="clients per round", ylabel="seconds per round", title="SecAgg+ against plain FedAvg")
    table = markdown_table(["clients per round", "s / round, plain FedAvg", "s / round, SecAgg+", "SecAgg+ / plain"],
                           [[r["clients"], f"{r['plain_round_seconds']:.2f}", f"{r['secagg_round_seconds']:.2f}",
                             f"{r['ratio']:.2f}x"] for r in rows])
    publish(NAME, f"Machine: {machine()}. Job: {result['job']}. Command: `{result['command']}`.\n\n{table}"
            f"\n\n![Seconds per round](benchmarks/results/{png.name})",
            quick=args.quick)


if __name__ == "__main__":
    main()
