"""What hardening SecAgg+ costs: fedtune's SecAgg+ against Flower's stock SecAgg+ and plain FedAvg.

    python -m benchmarks.secagg_hardening [--quick]

For each job, three federations on the same data and seed, one after another in this process
(simulations/inprocess.py: the real round loop and the real ClientApps, no Ray, clients in turn):
- plain FedAvg;
- stock SecAgg+, as fedtune ran it before it was hardened: Flower 1.41's `secaggplus_mod` and
  `SecAggPlusWorkflow` (32-bit-seeded masks, unsigned keys, no consistency check, no checks of
  the coordinator's parameters), patched in for this measurement only;
- fedtune's SecAgg+: keys signed and checked against the roster, the consistency check (one
  more message per client and round), HKDF + ChaCha20 masks, every stage's checks.
Jobs: the secagg-cost job (tiny BERT, BBC News, DP-SGD, every client sampled) at 5, 10 and 20
clients, where the protocol is most of a round, and the demo job (the defaults: all-MiniLM-L6-v2,
5 clients, DP-SGD), where training is. Seconds are the mean of the rounds after the first (which
also loads models and calibrates noise); the three variants alternate their order from job to
job. --quick: the tiny job at 5 clients, 2 rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

from flwr.app.message_type import MessageType
from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server.workflow import SecAggPlusWorkflow

from benchmarks.harness import default_out, log, machine, markdown_table, publish, write_result
from benchmarks.tiny_model import save_tiny_bert, steady_round_seconds
from client.app import client_fn_of
from client.policy_guard import note_transport
from common.config import RunConfig
from simulations.inprocess import federation, metrics, run
from simulations.simulate import OFFLINE_ENV

NAME = "secagg_hardening"
VARIANTS = ("plain FedAvg", "stock SecAgg+ (Flower 1.41)", "fedtune SecAgg+ (hardened)")


def stock_secagg_mod(msg, ctxt, call_next):
    """fedtune's client mod before hardening: note the transport, then Flower's own SecAgg+ mod."""
    if msg.metadata.message_type == MessageType.TRAIN:
        note_transport(ctxt, secure_aggregation=RECORD_KEY_CONFIGS in msg.content.config_records)
    return secaggplus_mod(msg, ctxt, call_next)


def stock_workflow(params, *, run_id: str) -> SecAggPlusWorkflow:
    """Flower's own workflow with the parameters fedtune derives (server/secure_aggregation.py)."""
    shares = params.num_shares if params.num_shares > 2 else 1.0
    threshold = params.reconstruction_threshold if params.num_shares > 2 else 1.0
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=params.max_weight,
                              clipping_range=params.clipping_range, timeout=params.timeout)


def run_variant(variant: str, config: RunConfig, out: Path) -> list[dict]:
    secure = variant != VARIANTS[0]
    config = config.with_overrides(secure_aggregation=secure)
    if variant == VARIANTS[1]:
        app = ClientApp(client_fn=client_fn_of(config=config, ledger_root=out / "ledgers"), mods=[stock_secagg_mod])
        grid, run_dir = federation(config, out, client_app=app)
        with mock.patch("server.federation.secagg_workflow", stock_workflow):
            run(grid, config, run_dir)
    else:
        grid, run_dir = federation(config, out)
        run(grid, config, run_dir)
    rounds = metrics(out)
    if not all(r["update_applied"] for r in rounds):
        raise RuntimeError(f"{variant}: a round applied no update: {[r['aggregation_failed'] for r in rounds]}")
    return rounds


def measure(label: str, config: RunConfig, out: Path, order: int) -> dict:
    row: dict = {"job": label}
    variants = VARIANTS[order % 3:] + VARIANTS[:order % 3]
    for variant in variants:
        rounds = run_variant(variant, config, out / f"{label}-{VARIANTS.index(variant)}")
        row[variant] = steady_round_seconds(rounds)
        log(f"{label}, {variant}: {row[variant]:.2f} s per round ({[r['seconds'] for r in rounds]})")
    row["hardened / stock"] = row[VARIANTS[2]] / row[VARIANTS[1]]
    row["hardened / plain"] = row[VARIANTS[2]] / row[VARIANTS[0]]
    row["stock / plain"] = row[VARIANTS[1]] / row[VARIANTS[0]]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=default_out())
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)
    shutil.rmtree(args.out / NAME, ignore_errors=True)  # run directories of an earlier measurement
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = RunConfig(model=str(save_tiny_bert(Path(tmp) / "tiny-bert")), data="bbc-news", max_length=32,
                         num_rounds=2 if args.quick else 4, dp=True, lora_rank=4, lora_variant="lora")
        for clients in (5,) if args.quick else (5, 10, 20):
            job = tiny.with_overrides(num_clients=clients, clients_per_round=clients)
            rows.append(measure(f"secagg-cost job, {clients} clients", job, args.out / NAME, len(rows)))
        if not args.quick:
            rows.append(measure("demo job, 5 clients", RunConfig(num_rounds=3), args.out / NAME, len(rows)))
    result = {"rows": rows, "command": "make bench-quick" if args.quick else "make bench",
              "note": "one process, no Ray, clients in turn; seconds: mean of rounds 2 to the last"}
    write_result(NAME, result, quick=args.quick)
    table = markdown_table(["job", *[f"s / round, {v}" for v in VARIANTS], "hardened / stock", "hardened / plain"],
                           [[r["job"], *[f"{r[v]:.2f}" for v in VARIANTS], f"{r['hardened / stock']:.2f}x",
                             f"{r['hardened / plain']:.2f}x"] for r in rows])
    publish(NAME, f"Machine: {machine()}. {result['note']}. Command: `{result['command']}`.\n\n{table}",
            quick=args.quick)


if __name__ == "__main__":
    main()
