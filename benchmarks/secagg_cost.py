"""What SecAgg+ adds to a round, and what hardening it added: plain FedAvg, Flower's stock SecAgg+
and fedtune's SecAgg+, side by side on the secagg-cost job (5, 10, 20 clients) and the demo job.

    python -m benchmarks.secagg_cost [--quick] [--sizes 5 10 20] [--no-demo]

Each point is three real `fedtune simulate` runs (Ray), one after another:
- plain FedAvg;
- stock SecAgg+, as fedtune ran it before it was hardened: Flower 1.41's `secaggplus_mod` and
  `SecAggPlusWorkflow` (32-bit-seeded masks, unsigned keys, no consistency check, no checks of
  the coordinator's parameters), patched in for this measurement only (`stock-simulate` below);
- fedtune's SecAgg+: keys signed and checked against the roster, survivor lists signed with the
  masked vectors (a fifth message stage, the consistency check, only in a round someone drops out
  of: none does here), HKDF + ChaCha20 masks, every stage's checks.
The secagg-cost job is the tiny model on BBC News (DP-SGD, 6 rounds, every client sampled): local
training is cheap, so the protocol's share of a round shows. The demo job is `make demo`'s
(all-MiniLM-L6-v2, 5 clients, DP-SGD) cut to 2 rounds to fit the hour. Round 1 (start-up, privacy
calibration) is left out of the mean; the variants rotate which goes first. --quick: the tiny job
at 5 clients only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

from benchmarks.harness import RESULTS, default_out, line_plot, machine, markdown_table, publish, simulate, write_result
from benchmarks.tiny_model import steady_round_seconds, tiny_job

NAME = "secagg_cost"
PLAIN, STOCK, HARDENED = "plain FedAvg", "stock SecAgg+", "fedtune SecAgg+"
VARIANTS = (PLAIN, STOCK, HARDENED)


def stock_secagg_mod(msg, ctxt, call_next):
    """fedtune's client mod before hardening: note the transport, then Flower's own SecAgg+ mod.
    (Defined in the module run as __main__, so Ray ships it to the actors by value.)"""
    from flwr.app.message_type import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from fedtune.client.policy_guard import note_transport

    if msg.metadata.message_type == MessageType.TRAIN:
        note_transport(ctxt, secure_aggregation=RECORD_KEY_CONFIGS in msg.content.config_records)
    return secaggplus_mod(msg, ctxt, call_next)


def stock_workflow(params, *, run_id: str):
    """Flower's own workflow with the parameters fedtune derives (server/secure_aggregation.py)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    shares = params.num_shares if params.num_shares > 2 else 1.0
    threshold = params.reconstruction_threshold if params.num_shares > 2 else 1.0
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=params.max_weight,
                              clipping_range=params.clipping_range, timeout=params.timeout)


def stock_simulate(argv: list[str]) -> None:
    """`fedtune simulate ARGS` with Flower's stock SecAgg+ on both sides (the baseline only)."""
    from fedtune.main import cli

    with mock.patch("fedtune.client.app.secure_aggregation_mod", lambda node_of: stock_secagg_mod), \
            mock.patch("fedtune.server.federation.secagg_workflow", stock_workflow):
        cli(["simulate", *argv], standalone_mode=False)


def run_variant(variant: str, job: dict, *, out: Path, label: str) -> list[dict]:
    keys = {**job, "secure-aggregation": variant != PLAIN}
    entry = ("benchmarks.secagg_cost", "stock-simulate") if variant == STOCK else None
    run = simulate(keys, out=out, label=f"{label}, {variant}", module=entry)
    if not all(r["update_applied"] for r in run.rounds):
        raise RuntimeError(f"{label}, {variant}: a round applied no update")
    return run.rounds


def measure(label: str, job: dict, *, out: Path, order: int) -> dict:
    row: dict = {"job": label}
    for variant in VARIANTS[order % 3:] + VARIANTS[:order % 3]:  # rotate which meets colder caches
        rounds = run_variant(variant, job, out=out / f"{label}-{VARIANTS.index(variant)}".replace(" ", "-"),
                             label=label)
        row[variant] = steady_round_seconds(rounds)
        row[f"{variant} rounds"] = [r["seconds"] for r in rounds]
    row["hardened / stock"] = row[HARDENED] / row[STOCK]
    row["hardened / plain"] = row[HARDENED] / row[PLAIN]
    row["stock / plain"] = row[STOCK] / row[PLAIN]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--sizes", type=int, nargs="+", help="clients per round of the tiny job (default 5 10 20)")
    parser.add_argument("--no-demo", action="store_true", help="leave out the demo job (about 20 minutes)")
    args = parser.parse_args()
    sizes = args.sizes or ((5,) if args.quick else (5, 10, 20))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # 6 rounds: a tiny round varies by a second with Poisson batch sizes; 5 steady rounds average it
        job = {**tiny_job(Path(tmp) / "tiny-bert"), "num-rounds": 6}
        for clients in sizes:
            rows.append(measure(f"{clients} clients", {**job, "num-clients": clients, "clients-per-round": clients},
                                out=args.out, order=len(rows)))
        if not args.quick and not args.no_demo:
            rows.append(measure("demo job", {"num-rounds": 2}, out=args.out, order=len(rows)))
    result = {"rows": rows, "job": "tiny BERT (2 layers, 32 wide), BBC News, max-length 32, LoRA r=4, DP-SGD, 6 rounds, "
                                   "every client sampled; the demo job is `make demo`'s (MiniLM, 5 clients) cut to 2 "
                                   "rounds; seconds: mean of rounds 2 to the last",
              "command": ("make bench-quick" if args.quick else "make bench") if not (args.sizes or args.no_demo)
              else "python -m benchmarks.secagg_cost " + " ".join(sys.argv[1:])}
    write_result(NAME, result, quick=args.quick)
    tiny = [r for r in rows if r["job"] != "demo job"]
    png = RESULTS / f"{NAME}{'_quick' if args.quick else ''}.png"
    line_plot(png, x=[int(r["job"].split()[0]) for r in tiny], series={v: [r[v] for r in tiny] for v in VARIANTS},
              xlabel="clients per round", ylabel="seconds per round", title="SecAgg+ against plain FedAvg")
    table = markdown_table(["job", *[f"s / round, {v}" for v in VARIANTS], "fedtune / stock SecAgg+",
                            "fedtune SecAgg+ / plain", "stock SecAgg+ / plain"],
                           [[r["job"], *[f"{r[v]:.2f}" for v in VARIANTS], f"{r['hardened / stock']:.2f}x",
                             f"{r['hardened / plain']:.2f}x", f"{r['stock / plain']:.2f}x"] for r in rows])
    publish(NAME, f"Machine: {machine()}. Job: {result['job']}. Command: `{result['command']}`.\n\n{table}"
            f"\n\n![Seconds per round](benchmarks/results/{png.name})",
            quick=args.quick)


if __name__ == "__main__":
    if sys.argv[1:2] == ["stock-simulate"]:
        stock_simulate(sys.argv[2:])
    else:
        main()
