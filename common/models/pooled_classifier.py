"""A classifier that reads the encoder the way it was trained to be read: pooled, then a linear head.

all-MiniLM-L6-v2 was trained as a sentence encoder with mean pooling (its `1_Pooling/config.json`);
Hugging Face's sequence-classification head reads the [CLS] token through a pooler it never
trained. Linear probing under DP lives or dies by its features, so probe and two-stage runs use
this model: the frozen encoder (with LoRA attached; frozen too in probe rounds), the pooling the
model was trained with, L2-normalised features (so one record's gradient on the head is bounded
by the clipping norm without clipping much), and a linear head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from fedtune.common.execution import ExecutionProfile, device_of, on_device
from fedtune.common.models.host import hosted_model
from fedtune.common.models.lora import LoraSettings, attach_lora

HEAD_MODULE = "classifier"  # the name PEFT keeps (modules_to_save) and the adapter sends
PRIOR_SCALE = 5.0  # logits of the label-name prior: cosine similarity times this (measured, BENCHMARKS.md)
# The prior embeds each label name in this generic sentence (public, like the names): zero-shot
# accuracy on BBC News 0.80 against 0.74 for the bare names (3 seeds' test splits, MiniLM).
PRIOR_TEMPLATE = "This text is about {}."


@dataclass(frozen=True)
class HeadSettings:
    """How a classifier reads its encoder: `mode` 'adapter' is Hugging Face's own sequence-classification
    head (the model as LoRA runs have always trained it); 'probe' and 'two-stage' build a PooledClassifier."""

    mode: str = "adapter"
    pooling: str = ""  # '' = the pooling the model folder says it was trained with
    prior: tuple[str, ...] = ()  # label names whose embeddings start the head (the coordinator's build)

    @classmethod
    def from_config(cls, config, *, label_names: Sequence[str] = ()) -> HeadSettings:
        prior = tuple(label_names) if config.head_prior else ()
        return cls(mode=config.training_mode, pooling=config.pooling, prior=prior)


def trained_pooling(model_path: Path) -> str:
    """'mean' or 'cls', as the folder's sentence-transformers Pooling module says; else 'mean'."""
    config = Path(model_path) / "1_Pooling" / "config.json"
    try:
        modes = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mean"
    if "pooling_mode" in modes:  # sentence-transformers 6 (what fedtune's SetFit export writes)
        return "cls" if modes["pooling_mode"] == "cls" else "mean"
    return "cls" if modes.get("pooling_mode_cls_token") and not modes.get("pooling_mode_mean_tokens") else "mean"


class PooledClassifier(torch.nn.Module):
    """encoder -> pooling -> L2 normalisation -> linear head. `features` skips the encoder: a probe
    round computes each record's features once and trains the head on them."""

    def __init__(self, encoder: torch.nn.Module, *, num_labels: int, pooling: str) -> None:
        super().__init__()
        self.encoder, self.pooling, self.config = encoder, pooling, encoder.config
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            vector = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            vector = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(vector.float(), dim=-1)  # fp32 features, whatever the base's dtype

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None, **_) -> SequenceClassifierOutput:
        if features is None:
            features = self.pooled(input_ids, attention_mask)
        return SequenceClassifierOutput(logits=self.classifier(features))


def build_pooled_classifier(*, model_path: Path, num_labels: int, lora: LoraSettings, seed: int, pooling: str,
                            freeze_lora: bool, prior: Sequence[str] = (), tokenizer=None,
                            profile: ExecutionProfile = ExecutionProfile(), resident: bool = False):
    """The PEFT model: LoRA on the encoder, the head kept whole (modules_to_save) and sent.

    `freeze_lora`: probe mode, where only the head trains and travels (LoRA stays at B = 0, the
    identity). `prior`: label names whose embeddings start the head (needs `tokenizer`)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def attach(encoder):
        model = PooledClassifier(encoder, num_labels=num_labels, pooling=pooling).to(device_of(encoder))
        if prior:
            start_from_label_names(model, label_names=prior, tokenizer=tokenizer)
        peft_model = attach_lora(model, task_type=None, lora=lora, targets=lora.targets_for(encoder.config.model_type),
                                 seed=seed, modules_to_save=[HEAD_MODULE])
        if freeze_lora:
            for name, param in peft_model.named_parameters():
                if ".lora_" in name:
                    param.requires_grad_(False)
        return peft_model

    return hosted_model(model_path=model_path, profile=profile, seed=seed, base_key=("encoder",),
                        load=lambda **kwargs: AutoModel.from_pretrained(str(model_path), **kwargs), attach=attach,
                        build_key=(lora, num_labels, pooling, freeze_lora, tuple(prior)), resident=resident)


@torch.no_grad()
def start_from_label_names(model: PooledClassifier, *, label_names: Sequence[str], tokenizer) -> None:
    """Head rows = the pooled embeddings of "This text is about <label name>." (scaled), bias 0: a
    zero-shot classifier by cosine similarity. Label names are shared with every party already,
    so this spends nothing."""
    was_training = model.training
    model.eval()
    sentences = [PRIOR_TEMPLATE.format(name) for name in label_names]
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    input_ids, attention_mask = on_device([batch["input_ids"], batch["attention_mask"]], device_of(model))
    model.classifier.weight.copy_(PRIOR_SCALE * model.pooled(input_ids, attention_mask))
    model.classifier.bias.zero_()
    model.train(was_training)


def head_linear(peft_model) -> torch.nn.Linear:
    """The head that trains and travels (PEFT's copy kept in modules_to_save)."""
    wrapper = getattr(peft_model.get_base_model(), HEAD_MODULE)
    return wrapper.modules_to_save["default"] if hasattr(wrapper, "modules_to_save") else wrapper
