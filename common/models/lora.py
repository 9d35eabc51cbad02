"""LoRA on a loaded base model: which modules, how it is attached, and FFA-LoRA's frozen A.

Default target modules come from PEFT's own table (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`);
fedtune adds only what PEFT lacks: DistilBERT's attention names and the MLP projections that
`lora-mlp = true` adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.common.errors import FedtuneError
from fedtune.common.models.adapter import adapter_sha256

# Attention projections PEFT has no default for, by Hugging Face `model_type`.
EXTRA_ATTENTION_TARGETS = {"distilbert": ["q_lin", "v_lin"]}
# LoRA on the MLP too (`lora-mlp = true`), by model type.
MLP_TARGETS = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_fc"],
}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: PEFT's default for the model type
    mlp: bool = False  # with automatic targets, also the MLP projections
    variant: str = "lora"  # "ffa": A frozen at its seeded initial value, only B trains and travels

    @classmethod
    def from_config(cls, config) -> LoraSettings:
        """The LoRA shape a run config asks for; every party must build the same one."""
        return cls(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   target_modules=tuple(config.target_modules), mlp=config.lora_mlp, variant=config.lora_variant)

    def targets_for(self, model_type: str) -> list[str]:
        if self.target_modules:
            return list(self.target_modules)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

        attention = peft_targets.get(model_type) or EXTRA_ATTENTION_TARGETS.get(model_type, [])
        targets = list(attention) + (MLP_TARGETS.get(model_type, []) if self.mlp else [])
        if not targets or (self.mlp and model_type not in MLP_TARGETS):
            raise FedtuneError(f"no default LoRA target modules for model type '{model_type}'"
                               f"{' (MLP)' if self.mlp else ''}; set lora-target-modules (comma-separated)")
        return targets


def attach_lora(base, *, task_type: str | None, lora: LoraSettings, targets: list[str], seed: int,
                modules_to_save: list[str] | None = None):
    """PEFT LoRA on `targets` of a loaded base model, each A drawn from `seed` in fp32 (B = 0);
    `modules_to_save` train whole and travel with the adapter (a custom model's head)."""
    from peft import LoraConfig, get_peft_model  # heavy: loaded when a model is built

    config = LoraConfig(task_type=task_type, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, modules_to_save=modules_to_save)
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise FedtuneError(f"cannot attach LoRA to {targets}: {exc}") from None
    draw_lora_a(model, seed=seed)
    if lora.variant == "ffa":
        freeze_lora_a(model)
    return model


@torch.no_grad()
def draw_lora_a(model: torch.nn.Module, *, seed: int) -> None:
    """Every LoRA A from its own generator, in fp32 on the CPU, as PEFT's default draws it
    (kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))). PEFT draws A and then
    casts it to the base's dtype: a bf16 node would hold another A than an fp32 node, and FFA-LoRA
    needs one A on every party, whatever its hardware."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if ".lora_A." in name:  # Linear layers' A (an embedding's A starts at zero in PEFT)
            bound = 1.0 / math.sqrt(param.shape[1])
            value = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            param.data = value.to(param.device)


def _is_lora_a(name: str) -> bool:
    return ".lora_A." in name or ".lora_embedding_A." in name


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA (Sun et al., ICLR 2024): keep every LoRA A at its initial value.

    A is drawn under the run seed, so every party holds the same A without sending it. Then
    the update of a layer is B·A with A shared, and the server's mean of the B's times A is
    exactly the mean of the clients' B·A, which averaging A and B separately is not. Frozen
    parameters drop out of `trainable_named_parameters`, so A is neither noised nor sent.
    """
    for name, param in model.named_parameters():
        if _is_lora_a(name):
            param.requires_grad_(False)


def lora_a_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of all LoRA A matrices: with FFA-LoRA they must match on every party."""
    return adapter_sha256([p.detach().cpu().numpy() for name, p in model.named_parameters() if _is_lora_a(name)])
