"""A probe round: the head alone, trained by full-batch DP-SGD on features computed once.

In a probe round the encoder does not change, so each record's pooled feature vector is computed
once per process (a simulation actor or a node runtime) and the head trains on those vectors: a
step costs microseconds instead of a forward pass. The DP mechanism is the same Opacus one as
every round (client/trainer.py): per-example gradients of the head, clipped, summed, noised, with
every record in every step (sample rate 1) as the plan accounts.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader, TensorDataset

from client.trainer import TrainResult, train_locally
from common.models.adapter import adapter_sha256
from common.models.pooled_classifier import head_linear
from common.privacy.accounting import HistoryEntry
from common.privacy.plan import PrivacyPlan

_features: dict[tuple, TensorDataset] = {}  # kept while the data and the encoder (its LoRA) are unchanged


def encoder_fingerprint(model) -> str:
    """Changes when anything the features depend on does: every LoRA matrix of the encoder."""
    return adapter_sha256([p.detach().numpy() for name, p in model.named_parameters() if ".lora_" in name])


@torch.no_grad()
def pooled_features(model, dataset: TensorDataset, *, batch_size: int = 64) -> TensorDataset:
    """(feature vector, label) for each record of a tokenized dataset, through the model's encoder."""
    classifier = model.get_base_model()
    was_training = classifier.training
    classifier.eval()
    vectors, labels = [], []
    for input_ids, attention_mask, label in DataLoader(dataset, batch_size=batch_size):
        vectors.append(classifier.pooled(input_ids, attention_mask))
        labels.append(label)
    classifier.train(was_training)
    if not vectors:
        return TensorDataset(torch.zeros((0, classifier.config.hidden_size)), torch.zeros((0,), dtype=torch.long))
    return TensorDataset(torch.cat(vectors), torch.cat(labels))


def cached_features(model, dataset: TensorDataset, *, data_key: tuple) -> TensorDataset:
    key = (data_key, encoder_fingerprint(model))
    if key not in _features:
        if len(_features) >= 4:
            _features.pop(next(iter(_features)))
        _features[key] = pooled_features(model, dataset)
    return _features[key]


def head_loss(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(features), labels)


def train_probe_round(*, model, dataset: TensorDataset, data_key: tuple, learning_rate: float, steps: int,
                      max_grad_norm: float, plan: PrivacyPlan | None, history: list[HistoryEntry],
                      seed: int) -> TrainResult:
    """Train the model's head in place on its cached features; `plan` is the round's (probe) stage."""
    features = cached_features(model, dataset, data_key=data_key)
    head = head_linear(model)
    trained = copy.deepcopy(head)  # a plain Linear: Opacus computes its per-example gradients exactly
    result = train_locally(model=trained, dataset=features, loss=head_loss, learning_rate=learning_rate,
                           batch_size=max(1, len(features)), local_epochs=steps, max_grad_norm=max_grad_norm,
                           plan=plan, history=history, seed=seed, optimizer="sgd")
    with torch.no_grad():
        head.weight.copy_(trained.weight)
        head.bias.copy_(trained.bias)
    return result
