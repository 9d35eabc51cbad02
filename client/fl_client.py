"""One institution's Flower client: budget guard, local DP training, evaluation.

It receives the global adapter, and answers with the *update* (local minus global) so the
values stay small enough for SecAgg+'s fixed-point range, plus a `FitReport`: the fields that
travel in clear (common/protocol.py). The privacy of a round is spent in `_train_round`:
the budget guard runs first, and the signed ledger record is on disk before the update leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from pathlib import Path

import numpy as np
from flwr.client import NumPyClient
from torch.utils.data import TensorDataset

from fedtune.client.node_data import NodeData, client_split, data_version, label_names_from, model_of, pin_refusal
from fedtune.client.policy_guard import Transport, data_refusal, request_refusal
from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.client.probe_round import train_probe_round
from fedtune.client.replay import replay_problem, replay_round
from fedtune.client.trainer import train_locally
from fedtune.client.update_cache import CachedUpdate, UpdateCache
from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile
from fedtune.common.models.adapter import adapter_sha256, adapter_to_arrays, arrays_to_adapter
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings, lora_a_sha256
from fedtune.common.models.pooled_classifier import HeadSettings
from fedtune.common.models.pooled_features import FEATURES_DIR
from fedtune.common.privacy.accounting import epsilon_of
from fedtune.common.privacy.policy import NodePolicy
from fedtune.common.privacy.plan import (PrivacyPlan, epsilon_after_next_round, fits_budget, is_probe_round, plan_of_config,
                                 same_schedule)
from fedtune.common.protocol import EvaluateInstructions, EvaluateReport, FitInstructions, FitReport, Status
from fedtune.common.tasks import get_task

log = logging.getLogger(__name__)

FitReply = tuple[list[np.ndarray], int, dict]


class FedtuneClient(NumPyClient):
    def __init__(self, *, config: RunConfig, ledger_dir: Path, run_id: str, partition_id: int | None = None,
                 node: NodeData | None = None, policy: NodePolicy | None = None,
                 transport: Transport | None = None, profile: ExecutionProfile | None = None) -> None:
        """`config` is the job as the coordinator asked it; `policy` the node's (a simulation's
        researcher holds every node, so by default the job is the policy); `profile` the node's
        hardware (by default the run's: a simulation)."""
        self.job = config
        self.policy = policy or NodePolicy.of_simulation(config)
        self.refusal = request_refusal(policy=self.policy, job=config, transport=transport)
        self.config = config if self.refusal else self.policy.applied_to(config)  # what the node does
        self.transport = transport
        self.profile = profile or config.profile
        self.task = get_task(config.task)
        self.node = node or NodeData(client_id=f"client-{partition_id}", partition_id=partition_id)
        self.partition_id = self.node.partition_id  # fault drills address clients by partition
        self.client_id = self.node.client_id
        self.ledger_dir = Path(ledger_dir)
        self.run_id = run_id
        self.label_names: tuple[str, ...] = ()

    # -- Flower entry points -----------------------------------------------------------------

    def fit(self, parameters: list[np.ndarray], config: dict) -> FitReply:
        instructions = FitInstructions.from_config(config)
        # The coordinator's run id survives a resume; Flower's changes with every (re)start.
        run_id = instructions.run_id or self.run_id
        ledger = self._ledger()
        refuse = functools.partial(self._refuse, ledger, run_id=run_id, server_round=instructions.server_round,
                                   parameters=parameters)
        refusal = self.refusal or pin_refusal(self.node, job=self.job, sent=instructions.label_names)
        if instructions.server_round < 1:  # every stage and plan is keyed by a round counted from 1
            refusal = f"a train request must name a server-round of 1 or more, not {instructions.server_round}"
        if refusal:  # before reading a record: the job asks for less than the policy allows
            return refuse(status=Status.REFUSED_POLICY, reason=refusal, num_examples=0)
        self.label_names = label_names_from(instructions, self.config, self.node)
        with self._data_errors_stay_here():
            num_examples = len(_encoded(self.config, self.node, self.label_names, "train"))
        reason = data_refusal(policy=self.policy, config=self.config, transport=self.transport,
                              num_examples=num_examples)
        if reason:
            return refuse(status=Status.REFUSED_POLICY, reason=reason, num_examples=num_examples)
        cache = UpdateCache(self.ledger_dir)
        reason = replay_problem(cache=cache, run_id=run_id, server_round=instructions.server_round,
                                peers=self.transport.peers if self.transport else None)
        if reason:
            return refuse(status=Status.REFUSED_REPLAY, reason=reason, num_examples=num_examples)
        replay = replay_round(ledger=ledger, cache=cache, run_id=run_id, server_round=instructions.server_round,
                              parameters=parameters)
        if replay is not None:
            return replay
        plan = self._plan(ledger, run_id=run_id, num_examples=num_examples)
        if isinstance(plan, str):
            return refuse(status=Status.REFUSED_POLICY, reason=plan, num_examples=num_examples)
        if plan is not None and not fits_budget(
                epsilon_after_next_round(ledger.history(), plan, instructions.server_round), plan):
            return refuse(status=Status.REFUSED_BUDGET, plan=plan, num_examples=num_examples)
        return self._train_round(parameters, ledger=ledger, cache=cache, plan=plan, run_id=run_id,
                                 instructions=instructions, num_examples=num_examples)

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        """Only as often as the policy allows, on the node's own validation records; each answer
        (and each refusal) is signed in the ledger, since the scores travel in clear."""
        instructions = EvaluateInstructions.from_config(config)
        run_id = instructions.run_id or self.run_id  # fedtune's, as a train request's: one run id per run
        ledger = self._ledger()
        answered = ledger.evaluations_answered()
        reason = pin_refusal(self.node, job=self.job, sent=instructions.label_names)
        if answered >= self.policy.max_evaluations:
            reason = (f"this node answers at most {self.policy.max_evaluations} evaluation request(s) "
                      f"(policy max-evaluations) and has answered {answered}")
        if reason:
            ledger.record(run_id=run_id, server_round=instructions.server_round, status=Status.REFUSED_POLICY,
                          plan=None, steps=0, epsilon=None, local_examples=0, policy=self.policy.to_record(),
                          reason=reason, request="evaluate")
            return 0.0, 0, EvaluateReport(client_id=self.client_id, reason=reason).to_metrics()
        self.label_names = label_names_from(instructions, self.config, self.node)
        with self._data_errors_stay_here():
            dataset = _encoded(self.config, self.node, self.label_names, "validation")
        scores = self.task.evaluate(model=self._model(parameters), dataset=dataset)
        ledger.record(run_id=run_id, server_round=instructions.server_round, status=Status.EVALUATED,
                      plan=None, steps=0, epsilon=None, local_examples=len(dataset),
                      policy=self.policy.to_record(), request="evaluate")
        # The task's scores alone (an allowlist): what else its evaluation computes stays here.
        report = EvaluateReport(client_id=self.client_id, scores={k: scores[k] for k in self.task.score_names})
        return scores["loss"], len(dataset), report.to_metrics()

    # -- the round ---------------------------------------------------------------------------

    def _plan(self, ledger: ClientPrivacyLedger, *, run_id: str, num_examples: int) -> PrivacyPlan | str | None:
        """This run's noise plan: read back from the ledger, or calibrated once in its first round.

        A plan read back never raises the node's budget (a coordinator can name any run id), and
        is reused only for the data it was made for; a str is the reason to refuse."""
        cfg = self.config
        if not cfg.dp:
            return None
        plan = ledger.plan_for(run_id)
        if plan is not None:
            if not same_schedule(plan, cfg, num_examples=num_examples):
                return (f"run {run_id}'s noise plan was made for other data or another training mode, batch-size, "
                        f"local-epochs or probe steps; start a new run")
            if plan.smallest_noise_multiplier < cfg.noise_multiplier:
                return (f"run {run_id}'s noise plan has sigma {plan.smallest_noise_multiplier:g}, below the "
                        f"{cfg.noise_multiplier:g} this node now requires; start a new run")
            return dataclasses.replace(plan, target_epsilon=min(plan.target_epsilon, cfg.target_epsilon),
                                       target_delta=min(plan.target_delta, cfg.target_delta),
                                       accountant=cfg.accountant)
        plan = plan_of_config(cfg, num_examples=num_examples, max_rounds=self.policy.max_rounds,
                              max_dp_steps=self.policy.max_dp_steps)  # data_refusal checked the caps
        log.info("%s: calibrated noise multiplier %.4f for %d rounds (q=%.4f, %d steps/round)",
                 self.client_id, plan.noise_multiplier, plan.planned_rounds, plan.sample_rate,
                 plan.steps_per_round)
        return plan

    def _refuse(self, ledger: ClientPrivacyLedger, *, status: Status, run_id: str, server_round: int,
                num_examples: int, parameters: list[np.ndarray], plan: PrivacyPlan | None = None,
                reason: str | None = None) -> FitReply:
        """The budget guard or the policy said no: sign the refusal and send zeros with weight 0."""
        spent = None if plan is None else epsilon_of(ledger.history(), delta=plan.target_delta,
                                                     accountant=plan.accountant)
        spent = spent if spent is not None and math.isfinite(spent) else None  # inf: a round without DP
        if reason is None:
            reason = f"this round would take epsilon past the node's budget {plan.target_epsilon:g}"
        log.warning("%s: refusing round %d: %s", self.client_id, server_round, reason)
        ledger.record(run_id=run_id, server_round=server_round, status=status, plan=plan, steps=0, epsilon=spent,
                      local_examples=num_examples, policy=self.policy.to_record(), reason=reason)
        report = FitReport(client_id=self.client_id, server_round=server_round, status=status, epsilon=spent,
                           **_plan_fields(plan and plan.for_round(server_round)), ledger_head=ledger.head_hash,
                           reason=reason)
        return [np.zeros_like(a) for a in parameters], 0, report.to_metrics()

    def _train_round(self, parameters: list[np.ndarray], *, ledger: ClientPrivacyLedger, cache: UpdateCache,
                     plan: PrivacyPlan | None, run_id: str, instructions: FitInstructions,
                     num_examples: int) -> FitReply:
        """Train under the plan, sign the spend, cache the update, then let it go."""
        server_round = instructions.server_round
        self.task.prepare_training_process()
        model = self._model(parameters)
        shared_a = self._check_shared_lora_a(model, expected=instructions.lora_a_sha256)
        result = self._train(model, plan=None if plan is None else plan.for_round(server_round),
                             history=ledger.history(), server_round=server_round)
        update = [new - old for new, old in zip(adapter_to_arrays(model), parameters, strict=True)]
        if shared_a and lora_a_sha256(model) != shared_a:
            raise RuntimeError("FFA-LoRA: a frozen LoRA A changed during local training")
        epsilon = None if plan is None else epsilon_of(result.history, delta=plan.target_delta,
                                                          accountant=plan.accountant)
        report = FitReport(client_id=self.client_id, server_round=server_round, status=Status.TRAINED,
                           steps=result.steps,
                           train_loss=result.train_loss if self.policy.share_train_loss
                           and not is_probe_round(self.config, server_round) else None,  # full batch: exact
                           update_max_abs=float(max(np.abs(u).max() for u in update)), epsilon=epsilon,
                           **_plan_fields(plan and plan.for_round(server_round)), lora_a_sha256=shared_a or None)
        fields = ledger.fields(run_id=run_id, server_round=server_round, status=Status.TRAINED, plan=plan,
                               steps=result.steps, epsilon=epsilon, local_examples=num_examples,
                               policy=self.policy.to_record(),
                               profile=self.profile.to_record(task_default_batch=self.task.default_physical_batch))
        cache.save(run_id=run_id, server_round=server_round, cached=CachedUpdate(
            update=update, num_examples=num_examples, global_sha256=adapter_sha256(parameters),
            ledger_fields=fields, metrics=report.to_metrics()))
        # Signed before the update leaves: once sent, the spend is real whatever happens next.
        ledger.append(fields)
        return update, num_examples, {**report.to_metrics(), "ledger_head": ledger.head_hash}

    def _train(self, model, *, plan: PrivacyPlan | None, history: list, server_round: int):
        """One round of local training: the head alone on cached features in a probe round, else
        the adapter (and head) through the model; `plan` is this round's stage."""
        cfg, seed = self.config, self.config.seed * 1_000_003 + server_round
        dataset = _encoded(cfg, self.node, self.label_names, "train")
        self.profile.apply_threads()
        if is_probe_round(cfg, server_round):  # features cached beside the ledger: the node's own, owner-only
            return train_probe_round(model=model, dataset=dataset, cache_dir=self.ledger_dir / FEATURES_DIR,
                                     learning_rate=cfg.probe_learning_rate, steps=cfg.probe_steps,
                                     max_grad_norm=cfg.max_grad_norm, plan=plan, history=history, seed=seed)
        return train_locally(model=model, dataset=dataset, loss=self.task.loss, learning_rate=cfg.learning_rate,
                             head_learning_rate=cfg.head_learning_rate, batch_size=cfg.batch_size,
                             local_epochs=cfg.local_epochs, max_grad_norm=cfg.max_grad_norm, plan=plan,
                             history=history, seed=seed,
                             physical_batch_size=self.profile.physical_batch(
                                 task_default=self.task.default_physical_batch))

    def _check_shared_lora_a(self, model, *, expected: str) -> str:
        """FFA-LoRA: this node's frozen A must be the coordinator's, or B means nothing there."""
        if self.config.lora_variant != "ffa":
            return ""
        mine = lora_a_sha256(model)
        if not expected:
            log.warning("%s: the coordinator sent no lora-a-sha256; cannot check that this node's frozen LoRA A "
                        "is the federation's (is the coordinator running lora-variant=ffa?)", self.client_id)
        elif mine != expected:
            raise FedtuneError(f"{self.client_id}: the frozen LoRA A built here (sha256 {mine[:12]}) differs from the "
                               f"coordinator's ({expected[:12]}); every party needs the same model folder, seed, "
                               f"lora-rank, lora-target-modules, lora-mlp, label set and torch/transformers/peft "
                               f"versions. Nothing was trained or spent.")
        return mine

    # -- helpers -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _data_errors_stay_here(self):
        """On a real node, what reading its data went wrong with (a column, a label, a length)
        is logged here only: Flower sends an exception's text to the coordinator, and every such
        detail, even a count, answers a question the coordinator chose to ask."""
        try:
            yield
        except FedtuneError as exc:
            if self.node.path is None:  # a simulation: the researcher holds the data anyway
                raise
            log.error("%s: this node's data does not fit the job: %s", self.client_id, exc)
            raise FedtuneError("this node's data does not fit this job (task, columns, labels or max-length); "
                               "the node's own log says why. Nothing was trained or spent.") from None

    def _ledger(self) -> ClientPrivacyLedger:
        return ClientPrivacyLedger(directory=self.ledger_dir, client_id=self.client_id)

    def _model(self, parameters: list[np.ndarray]):
        cfg = self.config
        model = self.task.build_model(model_path=self.task.model_path(model_of(cfg, self.node)),
                                      num_labels=len(self.label_names), lora=LoraSettings.from_config(cfg),
                                      seed=cfg.seed, head=HeadSettings.from_config(cfg, label_names=()),
                                      profile=self.profile, resident=True)  # reset per message, never rebuilt
        arrays_to_adapter(model, parameters)
        return model


def _plan_fields(plan: PrivacyPlan | None) -> dict:
    """The privacy parameters a reply states in clear (none without DP)."""
    if plan is None:
        return {}
    return {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "target_epsilon": plan.target_epsilon}


def _encoded(config: RunConfig, node: NodeData, label_names: tuple[str, ...], part: str) -> TensorDataset:
    """Tokenized local data, kept for the life of the process (a simulation actor or a node runtime)
    while the node's file is unchanged."""
    return _encoded_version(config, node, label_names, part, data_version(node))


@functools.lru_cache(maxsize=8)
def _encoded_version(config: RunConfig, node: NodeData, label_names: tuple[str, ...], part: str,
                     version) -> TensorDataset:
    split = getattr(client_split(config, node, label_names), part)
    task = get_task(config.task)
    tokenizer = load_tokenizer(task.model_path(model_of(config, node)))
    return task.encode(tokenizer=tokenizer, split=split, max_length=config.max_length)
