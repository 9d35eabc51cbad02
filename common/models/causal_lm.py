"""A causal LM with LoRA: loading (decoders only), and the per-example loss DP-SGD needs."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile
from fedtune.common.models.host import hosted_model
from fedtune.common.models.lora import LoraSettings, attach_lora

IGNORE = -100  # label value cross-entropy skips: prompt and padding tokens are not learned


# Config fields of models whose forward transforms the logits after the LM head; the loss here
# calls the decoder and the head directly, so it would silently differ from the model's own.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_causal_lm(model_path: Path) -> None:
    """Refuse a folder whose model is not a decoder with a language-model head, saying what it is."""
    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    transforms = [key for key in LOGIT_TRANSFORMS if config.get(key) not in (None, 1, 1.0)]
    if transforms:
        raise FedtuneError(f"model folder {model_path} scales or caps its logits ({', '.join(transforms)}); "
                           f"fedtune's per-example loss does not apply that yet, so task 'causal-lm' refuses it")
    architectures = config.get("architectures") or []
    if config.get("is_encoder_decoder") or not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        found = ", ".join(architectures) or "no architectures entry"
        raise FedtuneError(f"model folder {model_path} holds a '{config.get('model_type')}' model ({found}), not a "
                           f"causal language model; task 'causal-lm' needs a decoder such as LlamaForCausalLM "
                           f"(or set task = \"classification\")")


def build_lora_causal_lm(*, model_path: Path, lora: LoraSettings, seed: int,
                         profile: ExecutionProfile = ExecutionProfile(), resident: bool = False):
    """The base causal LM, frozen, with LoRA inside the decoder; LoRA A is drawn from the run seed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_causal_lm(model_path)
    model_type = json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    targets = lora.targets_for(model_type)
    hf_logging.disable_progress_bar()

    def load(**kwargs):
        base = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        base.config.use_cache = False  # training; generation turns the cache back on
        return base

    model = hosted_model(model_path=model_path, profile=profile, seed=seed, base_key=("causal-lm",), load=load,
                         attach=lambda base: attach_lora(base, task_type="CAUSAL_LM", lora=lora, targets=targets,
                                                         seed=seed),
                         build_key=lora, resident=resident, causal_lm=True)
    set_activation_checkpointing(model, enabled=profile.activation_checkpointing)
    _, head = _parts(model)
    if any(p.requires_grad for p in head.parameters()):
        # The head runs per example on 2-D input (see response_nll): Opacus would take tokens for examples.
        raise FedtuneError(f"LoRA targets {targets} reach the LM head; task 'causal-lm' trains adapters inside "
                           f"the decoder only: leave the head's module name out of lora-target-modules")
    return model


def set_activation_checkpointing(model: torch.nn.Module, *, enabled: bool) -> None:
    """Recompute each decoder layer during backward (PyTorch's non-reentrant checkpoint), in a
    way Opacus' per-sample hooks survive.

    Opacus records a module's input at every forward it sees, and a checkpointed layer runs
    forward twice: once, and again in backward. The LoRA modules would record twice and their
    per-sample gradients never be finalised. So during the first run they are marked "not
    training" (an nn.Linear computes the same either way, and Opacus records only training
    modules); only the recomputation, right before the backward hook that consumes it, records.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    trained = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    # early_stop=False: the recomputation runs to the layer's end, so the forward hook of its last
    # LoRA module fires (early stop would end it inside that module, after its last saved tensor).
    recompute = functools.partial(checkpoint, use_reentrant=False, early_stop=False,
                                  context_fn=lambda: (_unrecorded(trained), contextlib.nullcontext()))
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = enabled
            module._gradient_checkpointing_func = recompute


@contextlib.contextmanager
def _unrecorded(modules: list[torch.nn.Module]):
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def _parts(model: torch.nn.Module):
    """(decoder stack, LM head) of a PEFT causal LM, also when Opacus wraps it."""
    inner = getattr(model, "_module", model)  # opacus.GradSampleModule keeps the model here
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return base.get_decoder(), base.get_output_embeddings()


def response_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed negative log-likelihood of its response tokens, and their count.

    The vocabulary projection runs one example at a time under activation checkpointing, so
    a batch never holds batch x length x vocabulary logits (the largest tensor by far). The LM
    head is frozen, so recomputing it cannot disturb Opacus' per-sample gradient hooks.
    """
    width = max(int(attention_mask.sum(dim=1).max()), 2)  # right padding: trim the common tail
    input_ids, attention_mask, labels = input_ids[:, :width], attention_mask[:, :width], labels[:, :width]
    decoder, head = _parts(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    sums, counts = [], []
    for i in range(input_ids.shape[0]):
        keep = targets[i] != IGNORE
        sums.append(checkpoint(_token_nll_sum, head, hidden[i, :-1][keep], targets[i][keep], use_reentrant=False))
        counts.append(keep.sum())
    return torch.stack(sums), torch.stack(counts)


def _token_nll_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")  # a bf16 base: fp32 loss


def causal_lm_loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean over examples of each example's mean response-token loss.

    Each example's term depends on that example alone. A token mean over the whole batch
    would scale every example's gradient by the batch's token count, so one record could move
    the others' contributions, which per-sample clipping does not bound.
    """
    sums, counts = response_nll(model, input_ids, attention_mask, labels)
    return (sums / counts.clamp(min=1)).mean()
