"""A sequence classifier with LoRA: the base model, a fresh head for the federation's labels."""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.common.execution import ExecutionProfile
from fedtune.common.models.host import hosted_model
from fedtune.common.models.lora import LoraSettings, attach_lora


def build_lora_classifier(*, model_path: Path, num_labels: int, lora: LoraSettings, seed: int,
                          profile: ExecutionProfile = ExecutionProfile(), resident: bool = False):
    """The base model with a fresh `num_labels` head and LoRA attached; only those train.

    The random initialisation (LoRA A, the head) is drawn under a forked RNG seeded from the
    run seed, so it is reproducible without touching any other random stream in the process.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized head" is expected, not news
    hf_logging.disable_progress_bar()
    def load(**kwargs):
        return _loaded(AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=num_labels,
                                                                          **kwargs))

    def attach(base):
        return attach_lora(base, task_type="SEQ_CLS", lora=lora, targets=lora.targets_for(base.config.model_type),
                           seed=seed)

    return hosted_model(model_path=model_path, profile=profile, seed=seed, base_key=("classifier", num_labels),
                        load=load, attach=attach, build_key=lora, resident=resident)


def _loaded(base):
    if base.config.pad_token_id is None:
        base.config.pad_token_id = base.config.eos_token_id
    return base
