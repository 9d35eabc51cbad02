"""FedAvg over adapter *updates*: global + weighted mean of (local - global).

Under SecAgg+ the weighted mean arrives already computed by the protocol (each result carries
the same unmasked aggregate); on the plain path it is computed here. Either way the strategy
applies it, keeps what each client reported in clear for the round, and never sees a full model.
The global adapter changes in `aggregate_fit`, nowhere else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from flwr.common import (EvaluateIns, FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedtune.common.protocol import EvaluateInstructions, EvaluateReport, FitInstructions, FitReport, Status
from fedtune.server.node_identities import NodeIdentities
from fedtune.server.update_validation import update_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitReply:
    """A client's fit reply as the coordinator keeps it: the clear report and the weight."""

    report: FitReport
    num_examples: int


@dataclass(frozen=True)
class Evaluation:
    """A client's validation loss and scores for the round's adapter."""

    loss: float
    scores: dict[str, float]


@dataclass
class RoundOutcome:
    """What one round produced, for the progress table, metrics.jsonl, ledgers and stopping."""

    sampled: int = 0
    replies: dict[str, FitReply] = field(default_factory=dict)  # by client id
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # by client id
    failures: int = 0
    applied: bool = False
    aggregation_failed: str | None = None  # why no aggregate was produced, when that happened
    max_update_abs: float = 0.0
    rejected: dict[str, str] = field(default_factory=dict)  # client id -> why its update was not used
    secagg_refusals: dict[str, str] = field(default_factory=dict)  # institution -> why it refused a SecAgg+ stage
    dropped_at_setup: dict[int, str] = field(default_factory=dict)  # node id -> why it left before share-keys

    @property
    def trained(self) -> list[str]:
        return [cid for cid, reply in self.replies.items() if reply.report.status == Status.TRAINED]


class AdapterFedAvg(FedAvg):
    def __init__(self, *, initial_arrays: list[np.ndarray], clients_per_round: int, num_clients: int, run_id: str,
                 label_names: list[str], score_names: tuple[str, ...], shared_lora_a: str = "",
                 fraction_evaluate: float, secure_aggregation: bool, max_update_norm: float,
                 evaluate_fn: Callable[[int, list[np.ndarray]], tuple[float, dict]] | None = None,
                 identities: NodeIdentities | None = None) -> None:
        labels = tuple(label_names)
        super().__init__(
            fraction_fit=clients_per_round / num_clients, min_fit_clients=clients_per_round,
            fraction_evaluate=fraction_evaluate,
            min_evaluate_clients=max(1, math.ceil(fraction_evaluate * num_clients)) if fraction_evaluate else 0,
            min_available_clients=num_clients,
            # Clients of a deployment hold their own files: the label order comes from here.
            # With FFA-LoRA, `lora_a_sha256` lets each client check it holds the federation's frozen A.
            on_fit_config_fn=lambda rnd: FitInstructions(server_round=rnd, run_id=run_id, label_names=labels,
                                                         lora_a_sha256=shared_lora_a).to_config(),
            on_evaluate_config_fn=lambda rnd: EvaluateInstructions(server_round=rnd, label_names=labels,
                                                                    run_id=run_id).to_config(),
            initial_parameters=ndarrays_to_parameters(initial_arrays),
            evaluate_fn=(lambda rnd, arrays, _cfg: evaluate_fn(rnd, arrays)) if evaluate_fn else None,
            evaluate_metrics_aggregation_fn=lambda results: _weighted_mean(results, score_names),
        )
        self.score_names = score_names
        self.secure_aggregation = secure_aggregation
        self.max_update_norm = max_update_norm
        self.shapes = [a.shape for a in initial_arrays]
        self.global_arrays = [a.copy() for a in initial_arrays]
        self.outcomes: dict[int, RoundOutcome] = {}
        # With a roster (SecAgg+): sample only nodes identified as members (server/node_identities.py).
        self.identities = identities
        self.fit_ins: dict[int, FitIns] = {}  # the round's: what a node replacing a dropped one gets

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Exactly clients-per-round, not FedAvg's rounded fraction."""
        return self.min_fit_clients, self.min_available_clients

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list:
        if self.identities is None:
            instructions = super().configure_fit(server_round, parameters, client_manager)
        else:
            fit_ins = FitIns(parameters, self.on_fit_config_fn(server_round))
            self.fit_ins = {server_round: fit_ins}  # this round's only: it holds the whole global adapter
            instructions = [(proxy, fit_ins) for proxy in self.identities.sample(
                client_manager, self.min_fit_clients, min_available=self.min_available_clients)]
        self.outcomes[server_round] = RoundOutcome(sampled=len(instructions))
        return instructions

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager) -> list:
        """FedAvg's, but with a roster only among the nodes identified as members."""
        if self.identities is None or self.fraction_evaluate == 0.0:
            return super().configure_evaluate(server_round, parameters, client_manager)
        members = self.identities.identified(client_manager)
        size, _ = self.num_evaluation_clients(len(members))
        if not members or size > len(members):  # as Flower's sampling: too few, no evaluation
            return []
        evaluate_ins = EvaluateIns(parameters, self.on_evaluate_config_fn(server_round))
        return [(proxy, evaluate_ins) for proxy in members[:size]]

    def record_replies(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                       failures: list) -> RoundOutcome:
        """Keep what each client reported (in clear) for the round, whether or not it is aggregated."""
        outcome = self.outcomes.setdefault(server_round, RoundOutcome(sampled=len(results) + len(failures)))
        # Sampled clients without a usable reply: errors, timeouts, SecAgg+ dropouts (Flower may
        # list one dropout several times in `failures`, and a timeout not at all).
        outcome.failures = max(outcome.sampled - len(results), 0) if outcome.sampled else len(failures)
        for _, res in results:
            report = FitReport.from_metrics(res.metrics)
            outcome.replies[report.client_id] = FitReply(report=report, num_examples=res.num_examples)
        return outcome

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        outcome = self.record_replies(server_round, results, failures)
        trained = contributors(results)
        if not trained:
            log.warning("round %d: no client trained; the global adapter is unchanged", server_round)
            outcome.aggregation_failed = outcome.aggregation_failed or "no client trained"
            return None, {}
        if not self.secure_aggregation:
            trained = self._valid_updates(server_round, trained, outcome)
            if not trained:
                outcome.aggregation_failed = "every update was rejected"
                return None, {}
        update = self._mean_update(trained)
        problem = update_problem(update, shapes=self.shapes, max_norm=self.max_update_norm)
        if problem is not None:
            log.error("round %d: the aggregated update %s; the round is skipped", server_round, problem)
            outcome.aggregation_failed = f"aggregate rejected: it {problem}"
            return None, {}
        self.global_arrays = [g + u.astype(np.float32) for g, u in zip(self.global_arrays, update, strict=True)]
        outcome.applied = True
        outcome.max_update_abs = max(float(FitReport.from_metrics(res.metrics).update_max_abs) for _, res in trained)
        return ndarrays_to_parameters(self.global_arrays), {"clients_trained": len(trained)}

    def _valid_updates(self, server_round: int, trained: list, outcome: RoundOutcome) -> list:
        """Plain path: drop each update that is malformed or too large, keep the others."""
        kept = []
        for proxy, res in trained:
            problem = update_problem(parameters_to_ndarrays(res.parameters), shapes=self.shapes,
                                     max_norm=self.max_update_norm)
            cid = FitReport.from_metrics(res.metrics).client_id
            if problem is None:
                kept.append((proxy, res))
            else:
                outcome.rejected[cid] = problem
                log.warning("round %d: rejected the update of %s: it %s", server_round, cid, problem)
        return kept

    def _mean_update(self, trained: list[tuple[ClientProxy, FitRes]]) -> list[np.ndarray]:
        if self.secure_aggregation:
            # SecAgg+ replaced every result's parameters with the one unmasked weighted mean.
            return parameters_to_ndarrays(trained[0][1].parameters)
        total = sum(res.num_examples for _, res in trained)
        mean = None
        # In client order, not arrival order: the float sum is then the same on every run.
        for _, res in sorted(trained, key=lambda item: FitReport.from_metrics(item[1].metrics).client_id):
            weight = res.num_examples / total
            arrays = parameters_to_ndarrays(res.parameters)
            mean = [weight * a for a in arrays] if mean is None else [m + weight * a for m, a in zip(mean, arrays)]
        return mean

    def aggregate_evaluate(self, server_round: int, results: list, failures: list):
        outcome = self.outcomes.setdefault(server_round, RoundOutcome())
        results = [(proxy, res) for proxy, res in results if res.num_examples > 0]  # no validation data
        for _, res in results:
            report = EvaluateReport.from_metrics(res.metrics, score_names=self.score_names)
            outcome.evaluations[report.client_id] = Evaluation(loss=res.loss, scores=report.scores)
        if not results:
            return None, {}
        return super().aggregate_evaluate(server_round, results, failures)


def contributors(results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
    """Results that carry a trained update with a non-zero weight."""
    return [(proxy, res) for proxy, res in results
            if FitReport.from_metrics(res.metrics).status == Status.TRAINED and res.num_examples > 0]


def _weighted_mean(results: list[tuple[int, dict]], score_names: tuple[str, ...]) -> dict[str, Scalar]:
    """Example-weighted mean of the clients' validation scores (the task's, e.g. accuracy)."""
    total = sum(n for n, _ in results)
    if not total:
        return {}
    return {key: sum(n * float(m[key]) for n, m in results) / total
            for key in score_names if all(key in m for _, m in results)}
