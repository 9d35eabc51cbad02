"""Loss, accuracy and macro-F1 of a classifier on a tokenized split."""

from __future__ import annotations

import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader, TensorDataset


@torch.no_grad()
def evaluate_classifier(*, model: torch.nn.Module, dataset: TensorDataset,
                        batch_size: int = 64) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 (over the labels present) on `dataset`."""
    if len(dataset) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}
    was_training = model.training
    model.eval()
    total_loss, predictions, targets = 0.0, [], []
    for input_ids, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        total_loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(dim=-1))
        targets.append(labels)
    model.train(was_training)
    y_pred = torch.cat(predictions).numpy()
    y_true = torch.cat(targets).numpy()
    return {
        "loss": total_loss / len(dataset),
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
