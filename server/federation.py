"""The coordinator's whole run: it wires the parts together and runs the rounds.

Build the model and the global adapter, restore a checkpoint when resuming, evaluate on the
test split, aggregate with SecAgg+ (or plain FedAvg), and after each round hand the outcome to
the RoundRecorder; at the end export the adapter (with its model card, server/model_card.py) and
write summary.json (and samples.md).
"""

from __future__ import annotations

import logging
import random
import timeit
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.serverapp import Grid

from fedtune.common.config import RunConfig
from fedtune.common.flwr_run import SIMULATION_ROSTER
from fedtune.common.ledger.chain import Ledger
from fedtune.common.ledger.records import adapter_saved_fields
from fedtune.common.execution import base_dtype_name
from fedtune.common.models.adapter import adapter_sha256, adapter_to_arrays, arrays_to_adapter, save_adapter
from fedtune.common.models.artifact import is_pooled_classifier, is_sequence_classifier, share_files
from fedtune.common.models.base_reference import base_model_reference
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings, lora_a_sha256
from fedtune.common.models.pooled_classifier import HeadSettings, head_linear
from fedtune.common.models.pooled_features import FEATURES_DIR, cached_pooled_features
from fedtune.common.models.setfit_format import save_setfit_model
from fedtune.common.run_data import federated_splits
from fedtune.common.secure_aggregation.roster import Roster
from fedtune.common.storage import atomic_write, file_digests
from fedtune.common.tasks import get_task
from fedtune.common.tasks.base import GeneratesText, Task
from fedtune.common.tasks.classification import scores_of_logits
from fedtune.server.bookkeeping import run_summary, upload_bytes
from fedtune.server.checkpoint import Checkpoint
from fedtune.server.drills import crash_after_fit
from fedtune.server.early_stopping import EarlyStopping
from fedtune.server.model_card import CardFacts, fedtune_version, model_card
from fedtune.server.recorder import RoundCallback, RoundRecorder
from fedtune.server.resume import first_round, restore
from fedtune.server.rounds import Workflow, plain_fit_workflow, run_rounds
from fedtune.server.run_directory import RunDirectory
from fedtune.server.samples import SampleWriter
from fedtune.server.secure_aggregation import secagg_parameters, secagg_workflow
from fedtune.server.node_identities import NodeIdentities
from fedtune.server.strategy import AdapterFedAvg
from fedtune.server.update_validation import update_norm_bound

log = logging.getLogger(__name__)


class TestSetEvaluator:
    """Scores a global adapter on the coordinator's held-out test split, keeping each round's.

    A pooled classifier (probe, two-stage) is scored through its head on the test split's pooled
    features, cached under `features_dir` by a key that holds the encoder's LoRA: in probe rounds the
    encoder is unchanged, so the encoder runs over the split once, not every round. The scores are
    `task.evaluate`'s; any other model goes through `task.evaluate` itself. Resuming, round 0's
    scores are the checkpoint's."""

    def __init__(self, *, task: Task, model, dataset, checkpoint: Checkpoint | None = None,
                 features_dir: Path | None = None) -> None:
        self.task, self.model, self.dataset, self.features_dir = task, model, dataset, features_dir
        initial = checkpoint.initial_scores if checkpoint is not None else None
        self.scores: dict[int, dict] = {0: initial} if initial is not None else {}

    def __call__(self, server_round: int, arrays: list[np.ndarray]) -> tuple[float, dict]:
        arrays_to_adapter(self.model, arrays)
        self.scores[server_round] = self.evaluate()
        result = self.scores[server_round]
        return result["loss"], {k: v for k, v in result.items() if k != "loss"}

    def evaluate(self) -> dict[str, float]:
        if not is_pooled_classifier(self.model):
            return self.task.evaluate(model=self.model, dataset=self.dataset)
        # On disk only while the encoder is the base's (LoRA B = 0: probe rounds); after adapter
        # rounds its features change every round, and a file per round would be written for nothing.
        identity = all(not p.any() for name, p in self.model.named_parameters() if ".lora_B." in name)
        features, labels = cached_pooled_features(model=self.model, dataset=self.dataset,
                                                  cache_dir=self.features_dir if identity else None).tensors
        head = head_linear(self.model)
        with torch.no_grad():
            logits = head(features.to(device=head.weight.device, dtype=head.weight.dtype))
        return scores_of_logits(logits, labels)


def run_federation(*, grid: Grid, context: Context, config: RunConfig, run_dir: RunDirectory,
                   on_round: RoundCallback | None = None, resume: bool = False) -> dict:
    """Run the federation described by `config` and write `run_dir`; returns the summary.

    With `resume`, continue from the run directory's checkpoint (or from round 1 when the run
    died before its first checkpoint), under the same fedtune run id.
    """
    started = timeit.default_timer()
    random.seed(config.seed)  # Flower samples clients with `random`
    task, splits = get_task(config.task), federated_splits(config)
    model_path = task.model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    model = _coordinator_model(config=config, task=task, model_path=model_path, label_names=splits.label_names)
    initial = adapter_to_arrays(model)
    ledger = Ledger(run_dir.path / "ledgers" / "server")
    checkpoint = restore(run_dir=run_dir, ledger=ledger, initial=initial) if resume else None
    tester = TestSetEvaluator(task=task, model=model, checkpoint=checkpoint, features_dir=run_dir.path / FEATURES_DIR,
                              dataset=task.encode(tokenizer=tokenizer, split=splits.test, max_length=config.max_length))
    samples = _sample_writer(config=config, task=task, model=model, tokenizer=tokenizer, test=splits.test,
                             run_dir=run_dir)
    if samples is not None:
        samples.write_base(initial)
    # In a deployment the coordinator cannot see the institutions' data: max-client-examples says it.
    max_examples = config.max_client_examples or splits.max_client_examples
    strategy = AdapterFedAvg(
        initial_arrays=checkpoint.global_arrays if checkpoint else initial, run_id=run_dir.run_id,
        clients_per_round=config.clients_per_round, num_clients=config.num_clients,
        label_names=list(splits.label_names), score_names=task.score_names,
        shared_lora_a=lora_a_sha256(model) if config.lora_variant == "ffa" else "",
        fraction_evaluate=config.fraction_evaluate, secure_aggregation=config.secure_aggregation,
        max_update_norm=update_norm_bound(config=config, max_client_examples=max_examples,
                                          num_parameters=sum(a.size for a in initial)),
        evaluate_fn=tester, identities=_node_identities(config, run_dir=run_dir))
    fit_workflow, clipping_range = _fit_workflow(config, max_client_examples=max_examples, run_id=run_dir.run_id)
    log.info(splits.report)
    recorder = RoundRecorder(
        task=task, run_id=run_dir.run_id, run_dir=run_dir, ledger=ledger, strategy=strategy,
        test_scores=tester.scores, rounds=list(checkpoint.rounds) if checkpoint else [],
        bytes_up=upload_bytes(initial, secure=config.secure_aggregation),
        secure_aggregation=config.secure_aggregation, clipping_range=clipping_range, on_round=on_round,
        early_stopping=_early_stopping(config, task=task, model=model, tokenizer=tokenizer, splits=splits,
                                       rounds=checkpoint.rounds if checkpoint else []))
    start_round = first_round(checkpoint, num_rounds=config.num_rounds)
    run_rounds(grid=grid, fit_workflow=fit_workflow, start_round=start_round,
               context=LegacyContext(context=context, config=ServerConfig(num_rounds=config.num_rounds),
                                     strategy=strategy),
               evaluate_clients=config.fraction_evaluate > 0, after_round=recorder.after_round)
    summary = run_summary(task=task, config=config, rounds=run_dir.read_rounds(),
                          initial_scores=tester.scores.get(0, {}), seconds=timeit.default_timer() - started)
    summary["test_examples"] = len(splits.test)  # the coordinator's held-out split (the report's data line)
    if resume:
        summary["resumed_after_round"] = start_round - 1
    _export_adapter(config=config, model=model, tokenizer=tokenizer, model_path=model_path, run_dir=run_dir,
                    arrays=strategy.global_arrays, label_names=tuple(splits.label_names),
                    test_records=len(splits.test), summary=summary, ledger=ledger)
    summary["seconds"] = round(timeit.default_timer() - started, 2)
    run_dir.write_summary(summary)
    if samples is not None:  # after the summary: a failed generation loses no result
        samples.write_final(strategy.global_arrays, after_round=len(run_dir.read_rounds()))
    return summary


def _export_adapter(*, config: RunConfig, model, tokenizer, model_path: Path, run_dir: RunDirectory,
                    arrays: list[np.ndarray], label_names: tuple[str, ...], test_records: int, summary: dict,
                    ledger: Ledger) -> None:
    """adapter/ as a self-describing Hugging Face artifact (weights, label names, portable base
    reference, model card), then the server's adapter-saved record over every file in it: written
    last, so the audit finds exactly the files the record lists."""
    out = run_dir.adapter_dir
    classifier = is_sequence_classifier(model)
    labels = label_names if classifier else ()
    base = base_model_reference(model=config.model, model_path=model_path, task=config.task)
    if is_pooled_classifier(model):  # a SetFit model: SetFitModel.from_pretrained(adapter/) predicts labels
        save_setfit_model(model=model, arrays=arrays, out_dir=out, tokenizer=tokenizer, label_names=labels,
                          max_length=config.max_length, base=base)
    else:  # a PEFT adapter: PeftModel.from_pretrained(base, adapter/)
        save_adapter(model=model, arrays=arrays, out_dir=out, tokenizer=tokenizer, base=base, label_names=labels,
                     max_length=config.max_length if classifier else 0)
    rounds = run_dir.read_rounds()
    atomic_write(out / "README.md", model_card(CardFacts(
        config=config, run_id=run_dir.run_id, base=base, label_names=labels, test_records=test_records,
        rounds=rounds, summary=summary, version=fedtune_version(), base_dtype=base_dtype_name(model))))
    share_files(out)  # the weights come 0600 from safetensors; the folder is the user's to share
    ledger.append(adapter_saved_fields(run_id=run_dir.run_id, server_round=len(rounds),
                                       adapter_sha256=adapter_sha256(arrays), files=file_digests(out)))


def _coordinator_model(*, config: RunConfig, task: Task, model_path: Path, label_names: list[str]):
    """The global model: the initial adapter (a probe head starts from the label names' embeddings),
    and what the coordinator tests and exports."""
    return task.build_model(model_path=model_path, num_labels=len(label_names), lora=LoraSettings.from_config(config),
                            seed=config.seed, head=HeadSettings.from_config(config, label_names=label_names),
                            profile=config.profile)


def _early_stopping(config: RunConfig, *, task: Task, model, tokenizer, splits, rounds: list[dict]):
    """The stopping rule on the coordinator's validation split (None when early stopping is off)."""
    if not config.early_stopping_patience:
        return None
    stopper = EarlyStopping(task=task, model=model, patience=config.early_stopping_patience,
                            dataset=task.encode(tokenizer=tokenizer, split=splits.validation,
                                                max_length=config.max_length))
    stopper.restore(rounds)
    return stopper


def _node_identities(config: RunConfig, *, run_dir: RunDirectory) -> NodeIdentities | None:
    """With SecAgg+, the roster the coordinator samples from (server/node_identities.py): run config
    `roster`, or a simulation's own (written beside the clients' ledgers). None without one: then
    every registered node may be sampled, a stranger's included."""
    if not config.secure_aggregation:
        return None
    path = Path(config.roster) if config.roster else run_dir.path / "ledgers" / SIMULATION_ROSTER
    if not config.roster and not path.is_file():
        log.warning("no roster (run config 'roster'): every registered node may be sampled, and a node "
                    "that is no institution's takes a SecAgg+ round down for all; set roster='PATH' to the "
                    "federation's roster")
        return None
    return NodeIdentities(roster=Roster.load(path))


def _fit_workflow(config: RunConfig, *, max_client_examples: int, run_id: str) -> tuple[Workflow, float | None]:
    """SecAgg+ (with its clipping range) or plain FedAvg, wrapped in the crash drill if asked."""
    if config.secure_aggregation:
        params = secagg_parameters(config=config, max_client_examples=max_client_examples)
        log.info(params.describe())
        workflow, clipping_range = secagg_workflow(params, run_id=run_id), params.clipping_range
    else:
        workflow, clipping_range = plain_fit_workflow(config.round_timeout or None), None
    if config.inject_faults:
        workflow = crash_after_fit(workflow, spec=config.inject_faults)
    return workflow, clipping_range


def _sample_writer(*, config: RunConfig, task: Task, model, tokenizer, test, run_dir: RunDirectory):
    """samples.md for a task that generates text (None otherwise, or with samples = 0)."""
    if not isinstance(task, GeneratesText) or config.samples == 0:
        return None
    prompts, references = task.sample_pairs(test, min(config.samples, len(test)))
    return SampleWriter(task=task, model=model, tokenizer=tokenizer, prompts=prompts, references=references,
                        max_new_tokens=config.max_new_tokens, path=run_dir.path / "samples.md")
