"""One institution's Flower client: budget guard, local DP training, evaluation.

It receives the global adapter, and answers with the *update* (local minus global) so the
values stay small enough for SecAgg+'s fixed-point range, plus metrics that travel in clear.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
from flwr.client import NumPyClient

from client.node_data import NodeData, client_split, label_names_from
from client.privacy_ledger import REFUSED_BUDGET, TRAINED, ClientPrivacyLedger
from client.update_cache import CachedUpdate, UpdateCache
from client.trainer import train_locally
from common.config import RunConfig
from common.errors import FedtuneError
from common.faults import CORRUPTIONS, STALL, client_fault
from common.modeling import (LoraSettings, adapter_sha256, adapter_to_arrays, arrays_to_adapter, build_lora_model,
                             load_tokenizer, lora_a_sha256, resolve_model_path)
from common.privacy import epsilon_after_next_round, epsilon_of, fits_budget, plan_privacy
from common.splits import ClientSplit
from common.memory import release_freed_memory
from common.tasks import CAUSAL_LM, encode_split, evaluate_model
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

ALREADY_SPENT = "refused-already-spent"  # asked again for a round it paid for, but cannot re-send


class FedtuneClient(NumPyClient):
    def __init__(self, *, config: RunConfig, ledger_dir: Path, run_id: str, partition_id: int | None = None,
                 node: NodeData | None = None) -> None:
        self.config = config
        self.node = node or NodeData(client_id=f"client-{partition_id}", partition_id=partition_id)
        self.partition_id = self.node.partition_id  # fault drills address clients by partition
        self.client_id = self.node.client_id
        self.ledger_dir = Path(ledger_dir)
        self.run_id = run_id
        self.label_names: tuple[str, ...] = ()

    # -- Flower entry points -----------------------------------------------------------------

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        cfg = self.config
        server_round = int(config.get("server-round", 0))
        # The coordinator's run id survives a resume; Flower's changes with every (re)start.
        run_id = str(config.get("fedtune-run-id") or self.run_id)
        self.label_names = label_names_from(config, self.config)
        data = self._data()
        ledger = ClientPrivacyLedger(directory=self.ledger_dir, client_id=self.client_id)
        cache = UpdateCache(self.ledger_dir)
        replay = self._replay(ledger=ledger, cache=cache, run_id=run_id, server_round=server_round,
                              parameters=parameters)
        if replay is not None:
            return replay
        history = ledger.history()
        plan = ledger.plan_for(run_id) if cfg.dp else None
        if cfg.dp and plan is None:
            plan = plan_privacy(num_examples=len(data.train), batch_size=cfg.batch_size,
                                local_epochs=cfg.local_epochs, num_rounds=cfg.num_rounds,
                                target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                                accountant=cfg.accountant, noise_multiplier=cfg.noise_multiplier)
            log.info("%s: calibrated noise multiplier %.4f for %d rounds (q=%.4f, %d steps/round)",
                     self.client_id, plan.noise_multiplier, plan.planned_rounds, plan.sample_rate,
                     plan.steps_per_round)

        metrics: dict = {"client_id": self.client_id, "server_round": server_round}
        if plan is not None:
            metrics.update(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                           target_epsilon=plan.target_epsilon)
            if not fits_budget(epsilon_after_next_round(history, plan), plan):
                spent = epsilon_of(history, delta=plan.target_delta, accountant=plan.accountant)
                log.warning("%s: refusing round %d: it would exceed epsilon %.3g (spent %.3f)",
                            self.client_id, server_round, plan.target_epsilon, spent)
                ledger.record(run_id=run_id, server_round=server_round, status=REFUSED_BUDGET, plan=plan,
                              steps=0, epsilon=spent, local_examples=len(data.train))
                metrics.update(status=REFUSED_BUDGET, epsilon=spent, steps=0, train_loss=float("nan"),
                               update_max_abs=0.0, ledger_head=ledger.head_hash)
                return [np.zeros_like(a) for a in parameters], 0, metrics

        if cfg.task == CAUSAL_LM:
            release_freed_memory()  # activations of tens of MB per layer: return them to the OS when freed
        model = self._model(parameters)
        shared_a = self._check_shared_lora_a(model, expected=str(config.get("lora-a-sha256", "")))
        dataset = _encoded(cfg, self.node, self.label_names, "train")
        result = train_locally(model=model, dataset=dataset, learning_rate=cfg.learning_rate,
                               head_learning_rate=cfg.head_learning_rate,
                               batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                               max_grad_norm=cfg.max_grad_norm, plan=plan, history=history,
                               seed=cfg.seed * 1_000_003 + server_round, physical_batch_size=cfg.physical_batch)
        update = [new - old for new, old in zip(adapter_to_arrays(model), parameters, strict=True)]
        update = self._inject_fault(update, server_round)
        metrics.update(status=TRAINED, steps=result.steps, train_loss=result.train_loss,
                       update_max_abs=float(max(np.abs(u).max() for u in update)))
        if shared_a:
            if lora_a_sha256(model) != shared_a:
                raise RuntimeError("FFA-LoRA: a frozen LoRA A changed during local training")
            metrics["lora_a_sha256"] = shared_a  # public (seed-derived): lets the run show A stayed shared
        epsilon = None
        if plan is not None:
            epsilon = epsilon_of(result.history, delta=plan.target_delta, accountant=plan.accountant)
            metrics["epsilon"] = epsilon
        fields = ledger.fields(run_id=run_id, server_round=server_round, status=TRAINED, plan=plan,
                               steps=result.steps, epsilon=epsilon, local_examples=len(data.train))
        cache.save(run_id=run_id, server_round=server_round, cached=CachedUpdate(
            update=update, num_examples=len(data.train), global_sha256=adapter_sha256(parameters),
            ledger_fields=fields, metrics=metrics))
        # Signed before the update leaves: once sent, the spend is real whatever happens next.
        ledger.append(fields)
        metrics["ledger_head"] = ledger.head_hash
        self._stall_if_asked(server_round)
        return update, len(data.train), metrics

    def _replay(self, *, ledger: ClientPrivacyLedger, cache: UpdateCache, run_id: str, server_round: int,
                parameters: list[np.ndarray]) -> tuple[list[np.ndarray], int, dict] | None:
        """Answer a round this client was already asked (a resumed coordinator) without a second spend."""
        signed = ledger.record_for(run_id, server_round)
        cached = cache.load(run_id=run_id, server_round=server_round)
        if cached is not None and cached.ledger_fields.get("run_id") != run_id:
            cached = None
        if signed is None and cached is None:
            return None
        zeros = [np.zeros_like(a) for a in parameters]
        base = {"client_id": self.client_id, "server_round": server_round, "steps": 0,
                "train_loss": float("nan"), "update_max_abs": 0.0}
        if signed is not None and signed["status"] == REFUSED_BUDGET:
            return zeros, 0, {**base, "status": REFUSED_BUDGET, "epsilon": signed.get("epsilon"),
                              "ledger_head": ledger.head_hash}
        if cached is None or cached.global_sha256 != adapter_sha256(parameters):
            log.error("%s: round %d of run %s was already trained against %s global adapter; "
                      "not training it twice", self.client_id, server_round, run_id,
                      "a lost" if cached is None else "a different")
            return zeros, 0, {**base, "status": ALREADY_SPENT, "epsilon": (signed or {}).get("epsilon"),
                              "ledger_head": ledger.head_hash}
        if signed is None:  # crashed after caching, before signing: nothing has left yet; sign now
            ledger.append(cached.ledger_fields)
        log.info("%s: round %d of run %s was already trained; re-sending that update (no new spend)",
                 self.client_id, server_round, run_id)
        return cached.update, cached.num_examples, {**cached.metrics, "ledger_head": ledger.head_hash,
                                                    "resent": True}

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

    def _inject_fault(self, update: list[np.ndarray], server_round: int) -> list[np.ndarray]:
        """A fault drill's broken update (`inject-faults`), made before SecAgg+ would mask it."""
        if not self.config.inject_faults or self.partition_id is None:
            return update
        fault = client_fault(self.config.inject_faults, server_round=server_round,
                             partition_id=self.partition_id, kinds=CORRUPTIONS)
        if fault == "nan":
            return [np.full_like(u, np.nan) for u in update]
        if fault == "wrong-shape":
            return [u.reshape(-1)[: max(1, u.size // 2)].copy() for u in update]
        if fault == "scale-1000":
            return [u * 1000.0 for u in update]
        return update

    def _stall_if_asked(self, server_round: int) -> None:
        if self.partition_id is None or not self.config.inject_faults:
            return
        if client_fault(self.config.inject_faults, server_round=server_round, partition_id=self.partition_id,
                        kinds=(STALL,)):
            seconds = 2 * self.config.round_timeout if self.config.round_timeout else 60.0
            log.warning("%s: inject-faults stalls round %d for %.0f s", self.client_id, server_round, seconds)
            time.sleep(seconds)

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        self.label_names = label_names_from(config, self.config)
        dataset = _encoded(self.config, self.node, self.label_names, "validation")
        scores = evaluate_model(task=self.config.task, model=self._model(parameters), dataset=dataset)
        return scores["loss"], len(dataset), {
            "client_id": self.client_id, **{k: v for k, v in scores.items() if k != "loss"}}

    # -- helpers -----------------------------------------------------------------------------

    def _data(self) -> ClientSplit:
        return client_split(self.config, self.node, self.label_names)

    def _model(self, parameters: list[np.ndarray]):
        cfg = self.config
        model = build_lora_model(
            task=cfg.task,
            model_path=resolve_model_path(cfg.model, task=cfg.task),
            num_labels=len(self.label_names),
            lora=LoraSettings.from_config(cfg),
            seed=cfg.seed)
        arrays_to_adapter(model, parameters)
        return model


@functools.lru_cache(maxsize=8)
def _encoded(config: RunConfig, node: NodeData, label_names: tuple[str, ...], part: str) -> TensorDataset:
    """Tokenized local data, kept for the life of the process (a simulation actor or a node)."""
    split = getattr(client_split(config, node, label_names), part)
    tokenizer = load_tokenizer(resolve_model_path(config.model, task=config.task))
    return encode_split(task=config.task, tokenizer=tokenizer, split=split, max_length=config.max_length)
