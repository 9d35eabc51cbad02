"""The base model is read from disk once per process, and a cached build equals a fresh one."""

from __future__ import annotations

import torch

from common.models import base_cache
from common.models.classifier import build_lora_classifier
from common.models.lora import LoraSettings


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_cached_build_equals_a_fresh_one_and_reads_the_disk_once(tiny_model_dir):
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0)
    base_cache._cached.clear()
    before = base_cache.loads
    first = _state(build_lora_classifier(model_path=tiny_model_dir, num_labels=3, lora=lora, seed=7))
    second_model = build_lora_classifier(model_path=tiny_model_dir, num_labels=3, lora=lora, seed=7)
    assert base_cache.loads == before + 1  # the second build was a copy
    second = _state(second_model)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)  # head and LoRA A included
    with torch.no_grad():  # copies are private: training one never touches the cache
        next(p for n, p in second_model.named_parameters() if "lora_A" in n).add_(1.0)
    third = _state(build_lora_classifier(model_path=tiny_model_dir, num_labels=3, lora=lora, seed=7))
    assert all(torch.equal(first[name], third[name]) for name in first)
    other_seed = _state(build_lora_classifier(model_path=tiny_model_dir, num_labels=3, lora=lora, seed=8))
    assert base_cache.loads == before + 2  # another head draw is another load
    assert not all(torch.equal(first[name], other_seed[name]) for name in first)
