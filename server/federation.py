"""The coordinator's whole run: build the global adapter, run rounds, evaluate, write outputs."""

from __future__ import annotations

import logging
import os
import random
import signal
import timeit
from typing import Callable

import numpy as np
from flwr.app import Context
from flwr.common import ndarray_to_bytes
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import FedtuneError
from common.faults import coordinator_crashes
from common.json_safe import json_safe
from common.ledger import Ledger
from common.modeling import (LoraSettings, adapter_sha256, adapter_to_arrays, arrays_to_adapter, build_lora_model,
                             load_tokenizer, lora_a_sha256, resolve_model_path, save_adapter)
from common.splits import federated_splits
from common.tasks import CAUSAL_LM, encode_split, evaluate_model
from server.checkpoint import Checkpoint, random_state, restore_random_state
from server.rounds import plain_fit_workflow, run_rounds
from server.run_directory import RunDirectory
from server.secure_aggregation import secagg_parameters, secagg_workflow
from server.strategy import AdapterFedAvg, RoundOutcome
from server.update_validation import update_norm_bound

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict], None]


def run_federation(*, grid: Grid, context: Context, config: RunConfig, run_dir: RunDirectory,
                   on_round: RoundCallback | None = None, resume: bool = False) -> dict:
    """Run the federation described by `config` and write `run_dir`; returns the summary.

    With `resume`, continue from the run directory's checkpoint (or from round 1 when the run
    died before its first checkpoint), under the same fedtune run id.
    """
    started = timeit.default_timer()
    random.seed(config.seed)  # Flower samples clients with `random`
    run_id = run_dir.run_id
    splits = federated_splits(config)
    model_path = resolve_model_path(config.model, task=config.task)
    tokenizer = load_tokenizer(model_path)
    model = build_lora_model(
        task=config.task, model_path=model_path, num_labels=len(splits.label_names),
        lora=LoraSettings.from_config(config),
        seed=config.seed)
    initial = adapter_to_arrays(model)
    ledger = Ledger(run_dir.path / "ledgers" / "server")
    checkpoint = _restore(run_dir=run_dir, ledger=ledger, initial=initial) if resume else None
    start_round = checkpoint.completed_round + 1 if checkpoint else 1
    if checkpoint is not None and checkpoint.stopped:
        start_round = config.num_rounds + 1
    test_set = encode_split(task=config.task, tokenizer=tokenizer, split=splits.test, max_length=config.max_length)
    scores: dict[int, dict] = {0: checkpoint.initial_scores} if checkpoint else {}
    samples = _sample_writer(config=config, model=model, tokenizer=tokenizer, test=splits.test, run_dir=run_dir)
    if samples is not None:
        samples.write_base(initial)

    def evaluate(server_round: int, arrays: list[np.ndarray]) -> tuple[float, dict]:
        arrays_to_adapter(model, arrays)
        scores[server_round] = evaluate_model(task=config.task, model=model, dataset=test_set)
        result = scores[server_round]
        return result["loss"], {k: v for k, v in result.items() if k != "loss"}

    # In a deployment the coordinator cannot see the institutions' data: max-client-examples says it.
    max_examples = config.max_client_examples or splits.max_client_examples
    max_norm = update_norm_bound(config=config, max_client_examples=max_examples,
                                 num_parameters=sum(a.size for a in initial))
    strategy = AdapterFedAvg(initial_arrays=checkpoint.global_arrays if checkpoint else initial,
                             clients_per_round=config.clients_per_round, run_id=run_id,
                             label_names=list(splits.label_names),
                             shared_lora_a=lora_a_sha256(model) if config.lora_variant == "ffa" else "",
                             num_clients=config.num_clients, fraction_evaluate=config.fraction_evaluate,
                             secure_aggregation=config.secure_aggregation, max_update_norm=max_norm,
                             evaluate_fn=evaluate)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.num_rounds),
                           strategy=strategy)
    if config.secure_aggregation:
        params = secagg_parameters(config=config, max_client_examples=max_examples)
        log.info(params.describe())
        fit_workflow = secagg_workflow(params)
        clipping_range = params.clipping_range
    else:
        fit_workflow, clipping_range = plain_fit_workflow(config.round_timeout or None), None
    bytes_up = upload_bytes(initial, secure=config.secure_aggregation)
    log.info(splits.report)
    rounds: list[dict] = list(checkpoint.rounds) if checkpoint else []

    def fit_round(grid: Grid, ctx: LegacyContext) -> None:
        fit_workflow(grid, ctx)
        server_round = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if config.inject_faults and coordinator_crashes(config.inject_faults, server_round=server_round):
            log.error("inject-faults: killing the coordinator after round %d's replies, before its checkpoint",
                      server_round)
            os.kill(os.getpid(), signal.SIGKILL)

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
            "test_loss": test.get("loss"),
            **{f"test_{k}": test.get(k) for k in _test_metrics(config.task)},
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
        fields = json_safe(_server_ledger_fields(run_id=run_id, record=record, clients=clients,
                                                 adapter_sha256=adapter_sha256(strategy.global_arrays)))
        stop = bool(outcome.clients) and len(outcome.refused) == len(outcome.clients) == outcome.sampled
        rounds.append(json_safe(record))
        # Checkpoint first: a crash after this line loses nothing (resume completes the outputs).
        Checkpoint(completed_round=server_round, stopped=stop, global_arrays=strategy.global_arrays,
                   rounds=rounds, server_ledger_fields=fields, initial_scores=scores.get(0, {}),
                   random_state=random_state()).save(run_dir.path)
        run_dir.append_round(record)
        ledger.append(fields)
        if on_round is not None:
            on_round(record)
        if stop:
            log.warning("round %d: every sampled client refused (budget spent); stopping the run", server_round)
        return not stop

    completed = run_rounds(grid=grid, context=legacy, fit_workflow=fit_round, start_round=start_round,
                           evaluate_clients=config.fraction_evaluate > 0, after_round=after_round)
    save_adapter(model=model, arrays=strategy.global_arrays, out_dir=run_dir.adapter_dir, tokenizer=tokenizer)
    summary = _summary(config=config, rounds=run_dir.read_rounds(), completed=len(run_dir.read_rounds()),
                       initial=scores.get(0, {}), seconds=timeit.default_timer() - started)
    if resume:
        summary["resumed_after_round"] = start_round - 1
    run_dir.write_summary(summary)
    if samples is not None:  # after the summary: a failed generation loses no result
        samples.write_final(strategy.global_arrays, after_round=len(run_dir.read_rounds()))
    return summary


def _restore(*, run_dir: RunDirectory, ledger: Ledger, initial: list[np.ndarray]) -> Checkpoint | None:
    """Bring the run directory back to its last checkpoint, and the process state with it.

    metrics.jsonl is rewritten to exactly the checkpointed rounds (a round that was running at
    the crash is redone), and the server ledger gets the checkpointed round's record if the
    crash came between the checkpoint and the ledger append.
    """
    checkpoint = Checkpoint.load(run_dir.path)
    signed_rounds = [record["round"] for record in ledger.records]
    done = checkpoint.completed_round if checkpoint else 0
    if signed_rounds and signed_rounds[-1] > done:
        raise FedtuneError(f"the server ledger has round {signed_rounds[-1]} but the checkpoint only round "
                           f"{done}; {run_dir.path} was modified after the crash and cannot be resumed")
    if checkpoint is None:
        run_dir.rewrite_rounds([])
        log.warning("resuming %s from round 1: it stopped before its first checkpoint", run_dir.path)
        return None
    if [a.shape for a in checkpoint.global_arrays] != [a.shape for a in initial]:
        raise FedtuneError(f"the checkpoint's adapter does not fit the model of {run_dir.path / 'config.toml'}")
    run_dir.rewrite_rounds(checkpoint.rounds)
    if not signed_rounds or signed_rounds[-1] < done:
        ledger.append(checkpoint.server_ledger_fields)
    restore_random_state(checkpoint.random_state)
    log.warning("resuming %s after round %d", run_dir.path, done)
    return checkpoint


def _test_metrics(task: str) -> tuple[str, ...]:
    return ("perplexity",) if task == CAUSAL_LM else ("accuracy", "macro_f1")


def _sample_writer(*, config: RunConfig, model, tokenizer, test, run_dir: RunDirectory):
    """samples.md for a causal LM run (None for classification or samples = 0)."""
    if config.task != CAUSAL_LM or config.samples == 0:
        return None
    from server.samples import SampleWriter

    count = min(config.samples, len(test))
    return SampleWriter(model=model, tokenizer=tokenizer, prompts=test.prompts[:count],
                        references=test.responses[:count], max_new_tokens=config.max_new_tokens,
                        path=run_dir.path / "samples.md")


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
        "adapter_sha256": adapter_sha256,
        **{f"test_{k}": record.get(f"test_{k}") for k in ("accuracy", "perplexity") if f"test_{k}" in record},
    }


def _client_entry(metrics: dict) -> dict:
    keys = ("status", "epsilon", "noise_multiplier", "sample_rate", "steps", "train_loss", "num_examples",
            "update_max_abs", "lora_a_sha256", "rejected", "resent", "val_loss", "val_accuracy", "val_macro_f1", "val_perplexity")
    return {k: metrics.get(k) for k in keys if k in metrics}


def upload_bytes(arrays: list[np.ndarray], *, secure: bool) -> int:
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
    if config.task == CAUSAL_LM:
        scores = {"test_loss": last.get("test_loss"), "test_perplexity": last.get("test_perplexity"),
                  "base_loss": initial.get("loss"), "base_perplexity": initial.get("perplexity")}
    else:
        scores = {"test_accuracy": last.get("test_accuracy"), "test_macro_f1": last.get("test_macro_f1"),
                  "initial_test_accuracy": initial.get("accuracy")}
    return {
        "task": config.task,
        "rounds_completed": completed,
        **scores,
        "dp": config.dp,
        "secure_aggregation": config.secure_aggregation,
        "target_epsilon": config.target_epsilon if config.dp else None,
        "target_delta": config.target_delta if config.dp else None,
        "epsilon": dict(sorted(epsilon.items())),
        "noise_multiplier": dict(sorted(noise.items())),
        "seconds": round(seconds, 2),
    }
