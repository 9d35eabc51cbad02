"""The adapter as what travels: the trainable parameters (LoRA matrices, plus the classification
head for classifiers) as a list of float32 arrays in parameter order, and back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedtune.common.errors import FedtuneError
from fedtune.common.models.artifact import is_sequence_classifier, name_base, save_label_config, save_tokenizer
from fedtune.common.models.base_reference import BaseModelReference


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter (LoRA + head) in a fixed order: the order arrays travel in."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def adapter_to_arrays(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().astype(np.float32, copy=True)
            for _, p in trainable_named_parameters(model)]


def adapter_sha256(arrays: list[np.ndarray]) -> str:
    """A fingerprint of an adapter (or update): float32 bytes in parameter order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def arrays_to_adapter(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays into the adapter, refusing anything that does not fit it exactly."""
    named = trainable_named_parameters(model)
    if len(arrays) != len(named):
        raise FedtuneError(f"adapter update has {len(arrays)} tensors, the model expects {len(named)}; "
                           f"was it made with the same base model (a node loads the one its node config 'model' "
                           f"names), lora-rank, target modules and lora-variant?")
    with torch.no_grad():
        for (name, param), array in zip(named, arrays, strict=True):
            if tuple(array.shape) != tuple(param.shape):
                raise FedtuneError(f"adapter tensor {name} has shape {tuple(array.shape)}, "
                                   f"expected {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))


def save_adapter(*, model, arrays: list[np.ndarray], out_dir: Path, tokenizer=None,
                 base: BaseModelReference | None = None, label_names: Sequence[str] = (),
                 max_length: int = 0) -> None:
    """Write the adapter so `PeftModel.from_pretrained(base, out_dir)` restores it, and so the folder
    says what it needs and predicts (common/models/artifact.py): the base by a portable name and
    hash, a classifier's label names in config.json, the tokenizer truncating at `max_length`."""
    arrays_to_adapter(model, arrays)
    model.save_pretrained(str(out_dir))
    if base is not None:
        name_base(out_dir=out_dir, base=base)
    if label_names and is_sequence_classifier(model):
        save_label_config(model=model, out_dir=out_dir, label_names=label_names)
    if tokenizer is not None:
        save_tokenizer(tokenizer=tokenizer, out_dir=out_dir, max_length=max_length)
