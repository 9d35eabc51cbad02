"""The coordinator's whole run: build the global adapter, run rounds, evaluate, write outputs."""

from __future__ import annotations

import hashlib
import logging
import random
import timeit
from typing import Callable

import numpy as np
from flwr.app import Context
from flwr.common import ndarray_to_bytes
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from common.config import RunConfig
from common.evaluation import evaluate_classifier
from common.ledger import Ledger
from common.modeling import (LoraSettings, adapter_to_arrays, arrays_to_adapter, build_lora_classifier,
                             load_tokenizer, resolve_model_path, save_adapter)
from common.splits import federated_splits
from common.tokens import encode
from server.rounds import run_rounds
from server.run_directory import RunDirectory
from server.secure_aggregation import secagg_parameters, secagg_workflow
from server.strategy import AdapterFedAvg, RoundOutcome
from server.update_validation import update_norm_bound

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict], None]


def run_federation(*, grid: Grid, context: Context, config: RunConfig, run_dir: RunDirectory,
                   on_round: RoundCallback | None = None) -> dict:
    """Run the federation described by `config` and write `run_dir`; returns the summary."""
    started = timeit.default_timer()
    random.seed(config.seed)  # Flower samples clients with `random`
    splits = federated_splits(config)
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    model = build_lora_classifier(
        model_path=model_path, num_labels=len(splits.label_names),
        lora=LoraSettings.from_config(config),
        seed=config.seed)
    initial = adapter_to_arrays(model)
    test_set = encode(tokenizer=tokenizer, split=splits.test, max_length=config.max_length)
    scores: dict[int, dict] = {}

    def evaluate(server_round: int, arrays: list[np.ndarray]) -> tuple[float, dict]:
        arrays_to_adapter(model, arrays)
        scores[server_round] = evaluate_classifier(model=model, dataset=test_set)
        result = scores[server_round]
        return result["loss"], {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}

    max_norm = update_norm_bound(config=config, max_client_examples=splits.max_client_examples,
                                 num_parameters=sum(a.size for a in initial))
    strategy = AdapterFedAvg(initial_arrays=initial, clients_per_round=config.clients_per_round,
                             num_clients=config.num_clients, fraction_evaluate=config.fraction_evaluate,
                             secure_aggregation=config.secure_aggregation, max_update_norm=max_norm,
                             evaluate_fn=evaluate)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.num_rounds),
                           strategy=strategy)
    if config.secure_aggregation:
        params = secagg_parameters(config=config, max_client_examples=splits.max_client_examples)
        log.info(params.describe())
        fit_workflow = secagg_workflow(params)
        clipping_range = params.clipping_range
    else:
        fit_workflow, clipping_range = default_fit_workflow, None
    bytes_up = _upload_bytes(initial, secure=config.secure_aggregation)
    ledger = Ledger(run_dir.path / "ledgers" / "server")
    log.info(splits.report)

    def after_round(server_round: int, seconds: float) -> bool:
        outcome = strategy.outcomes.get(server_round) or RoundOutcome()
        clients = {cid: {**metrics, **outcome.evaluations.get(cid, {}),
                         **({"rejected": outcome.rejected[cid]} if cid in outcome.rejected else {})}
                   for cid, metrics in outcome.clients.items()}
        if clipping_range is not None and outcome.max_update_abs > clipping_range:
            log.warning("round %d: an update coordinate reached %.4g, beyond the SecAgg+ clipping range "
                        "±%.4g, and was clipped; raise secagg-clipping-range", server_round,
                        outcome.max_update_abs, clipping_range)
        test = scores.get(server_round, {})
        record = {
            "round": server_round,
            "test_loss": test.get("loss"), "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "seconds": round(seconds, 3),
            "bytes_up_per_client": bytes_up,
            "aggregation": "secagg+" if config.secure_aggregation else "plain",
            "update_applied": outcome.applied,
            "aggregation_failed": outcome.aggregation_failed,
            "clients_sampled": outcome.sampled,
            "clients_trained": len(outcome.trained),
            "failures": outcome.failures,
            "clients": {cid: _client_entry(c) for cid, c in sorted(clients.items())},
        }
        run_dir.append_round(record)
        ledger.append(_server_ledger_fields(run_id=str(context.run_id), record=record, clients=clients,
                                            adapter_sha256=adapter_sha256(strategy.global_arrays)))
        if on_round is not None:
            on_round(record)
        if outcome.clients and len(outcome.refused) == len(outcome.clients) == outcome.sampled:
            log.warning("round %d: every sampled client refused (budget spent); stopping the run", server_round)
            return False
        return True

    completed = run_rounds(grid=grid, context=legacy, fit_workflow=fit_workflow,
                           evaluate_clients=config.fraction_evaluate > 0, after_round=after_round)
    save_adapter(model=model, arrays=strategy.global_arrays, out_dir=run_dir.adapter_dir, tokenizer=tokenizer)
    summary = _summary(config=config, rounds=run_dir.read_rounds(), completed=completed,
                       initial=scores.get(0, {}), seconds=timeit.default_timer() - started)
    run_dir.write_summary(summary)
    return summary


def adapter_sha256(arrays: list[np.ndarray]) -> str:
    """A fingerprint of the global adapter, as float32 bytes in parameter order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _server_ledger_fields(*, run_id: str, record: dict, clients: dict, adapter_sha256: str) -> dict:
    """What the coordinator signs for a round: who was asked, who trained, what each reported."""
    by_status: dict[str, list[str]] = {}
    for cid, metrics in sorted(clients.items()):
        by_status.setdefault(str(metrics.get("status")), []).append(cid)
    return {
        "kind": "server", "run_id": run_id, "round": record["round"],
        "sampled": record["clients_sampled"], "replied": sorted(clients),
        "trained": by_status.get("trained", []), "refused": by_status.get("refused-budget", []),
        "failures": record["failures"],
        "epsilon": {cid: m.get("epsilon") for cid, m in sorted(clients.items())},
        "client_ledger_heads": {cid: m.get("ledger_head") for cid, m in sorted(clients.items())},
        "aggregation": record["aggregation"], "update_applied": record["update_applied"],
        "aggregation_failed": record["aggregation_failed"],
        "rejected": {cid: m["rejected"] for cid, m in sorted(clients.items()) if "rejected" in m},
        "adapter_sha256": adapter_sha256, "test_accuracy": record["test_accuracy"],
    }


def _client_entry(metrics: dict) -> dict:
    keys = ("status", "epsilon", "noise_multiplier", "sample_rate", "steps", "train_loss", "num_examples",
            "update_max_abs", "rejected", "val_loss", "val_accuracy", "val_macro_f1")
    return {k: metrics.get(k) for k in keys if k in metrics}


def _upload_bytes(arrays: list[np.ndarray], *, secure: bool) -> int:
    """Bytes of the adapter update one client uploads, as Flower serializes it.

    SecAgg+ sends int64 masked fixed-point values plus one array for the weight factor.
    """
    if secure:
        shapes = [(1,)] + [a.shape for a in arrays]
        return sum(len(ndarray_to_bytes(np.zeros(s, dtype=np.int64))) for s in shapes)
    return sum(len(ndarray_to_bytes(a.astype(np.float32))) for a in arrays)


def _summary(*, config: RunConfig, rounds: list[dict], completed: int, initial: dict, seconds: float) -> dict:
    last = rounds[-1] if rounds else {}
    epsilon: dict[str, float | None] = {}
    noise: dict[str, float | None] = {}
    for record in rounds:  # the latest report of each client wins
        for cid, entry in record["clients"].items():
            if "epsilon" in entry:
                epsilon[cid] = entry["epsilon"]
            if "noise_multiplier" in entry:
                noise[cid] = entry["noise_multiplier"]
    return {
        "rounds_completed": completed,
        "test_accuracy": last.get("test_accuracy"),
        "test_macro_f1": last.get("test_macro_f1"),
        "initial_test_accuracy": initial.get("accuracy"),
        "dp": config.dp,
        "secure_aggregation": config.secure_aggregation,
        "target_epsilon": config.target_epsilon if config.dp else None,
        "target_delta": config.target_delta if config.dp else None,
        "epsilon": dict(sorted(epsilon.items())),
        "noise_multiplier": dict(sorted(noise.items())),
        "seconds": round(seconds, 2),
    }
