"""A probe round: the head alone, trained by full-batch DP-SGD on features computed once.

In a probe round the encoder does not change, so each record's pooled feature vector is computed
once per node (common/models/pooled_features.py: in memory, and on disk under `cache_dir` so that
another simulation actor or a restarted node runtime reads them back) and the head trains on those
vectors: a step costs microseconds instead of a forward pass. The DP mechanism is the same Opacus
one as every round (client/trainer.py): per-example gradients of the head, clipped, summed,
noised, with every record in every step (sample rate 1) as the plan accounts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fedtune.client.trainer import TrainResult, train_locally
from fedtune.common.models.pooled_classifier import head_linear
from fedtune.common.models.pooled_features import cached_pooled_features
from fedtune.common.privacy.accounting import HistoryEntry
from fedtune.common.privacy.plan import PrivacyPlan


def head_loss(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(features), labels)


def train_probe_round(*, model, dataset: TensorDataset, learning_rate: float, steps: int, max_grad_norm: float,
                      plan: PrivacyPlan | None, history: list[HistoryEntry], seed: int,
                      cache_dir: Path | None = None) -> TrainResult:
    """Train the model's head in place on its cached features; `plan` is the round's (probe) stage.

    `cache_dir`: the node's folder of feature files (None: this process's memory only); the key
    hashes the dataset's tensors themselves, so a changed data file is a miss."""
    features = cached_pooled_features(model=model, dataset=dataset, cache_dir=cache_dir)
    head = head_linear(model)
    trained = copy.deepcopy(head)  # a plain Linear: Opacus computes its per-example gradients exactly
    result = train_locally(model=trained, dataset=features, loss=head_loss, learning_rate=learning_rate,
                           batch_size=max(1, len(features)), local_epochs=steps, max_grad_norm=max_grad_norm,
                           plan=plan, history=history, seed=seed, optimizer="sgd")
    with torch.no_grad():
        head.weight.copy_(trained.weight)
        head.bias.copy_(trained.bias)
    return result
