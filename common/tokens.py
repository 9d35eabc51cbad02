"""Turn texts into the fixed tensors DP training needs (a TensorDataset of ids, mask, label)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from common.splits import Split


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
