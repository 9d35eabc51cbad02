"""Task "causal-lm": instruction fine-tuning of a generative model on prompt/response pairs.

Only LoRA inside the decoder trains (no head); the loss and the perplexity count response
tokens only. The default model is SmolLM2-135M-Instruct and the default corpus chatterbot's
English question/answer pairs (both packaged offline).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.common.data.instructions import InstructionPairs, InstructionSplit, load_instruction_pairs
from fedtune.common.execution import ExecutionProfile, device_of, on_device
from fedtune.common.models.causal_lm import build_lora_causal_lm, causal_lm_loss, check_causal_lm, response_nll
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.memory import release_freed_memory
from fedtune.common.models.smollm2 import smollm2_folder
from fedtune.common.tasks.base import GeneratesText, Task
from fedtune.common.tasks.chat_tokens import encode_pairs, keep_fitting, prompt_ids


@torch.no_grad()
def evaluate_causal_lm(*, model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 16) -> dict[str, float]:
    """Held-out loss per response token and its perplexity (exp of that loss)."""
    if len(dataset) == 0:
        return {"loss": float("nan"), "perplexity": float("nan")}
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = device_of(model)
    for batch in DataLoader(dataset, batch_size=batch_size):
        sums, counts = response_nll(model, *on_device(batch, device))
        total += float(sums.sum())
        tokens += int(counts.sum())
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


@torch.no_grad()
def generate(*, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (deterministic, so base and fine-tuned compare fairly)."""
    was_training = model.training
    model.eval()
    replies = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device_of(model))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return replies


class CausalLM(Task, GeneratesText):
    name = "causal-lm"
    score_names = ("perplexity",)
    headline_metric = "perplexity"
    progress_columns = (("test loss", "test_loss", ".4f"), ("perplexity", "test_perplexity", ".2f"))
    default_physical_batch = 8  # activations dominate memory

    def default_model_folder(self) -> Path:
        return smollm2_folder()

    def check_model(self, path: Path) -> None:
        check_causal_lm(path)

    def build_model(self, *, model_path: Path, num_labels: int, lora, seed: int, head=None, profile=None,
                    resident: bool = False):
        return build_lora_causal_lm(model_path=model_path, lora=lora, seed=seed, profile=profile or ExecutionProfile(),
                                    resident=resident)

    def data_columns(self, source) -> tuple[str, str]:
        return source.prompt_column, source.response_column

    def load_examples(self, *, data: str, columns: tuple[str, str], model: str, max_length: int) -> InstructionPairs:
        """Pairs whose prompt leaves room for part of the response within `max_length` tokens
        (the rest are dropped and counted)."""
        pairs = load_instruction_pairs(data=data, prompt_column=columns[0], response_column=columns[1])
        return keep_fitting(pairs, tokenizer=load_tokenizer(self.model_path(model)), max_length=max_length)

    def encode(self, *, tokenizer, split: InstructionSplit, max_length: int) -> TensorDataset:
        return encode_pairs(tokenizer=tokenizer, split=split, max_length=max_length)

    def loss(self, model, input_ids, attention_mask, labels) -> torch.Tensor:
        return causal_lm_loss(model, input_ids, attention_mask, labels)

    def evaluate(self, *, model, dataset: TensorDataset) -> dict[str, float]:
        return evaluate_causal_lm(model=model, dataset=dataset)

    def summary_scores(self, *, last: dict, initial: dict) -> dict:
        return {"test_loss": last.get("test_loss"), "test_perplexity": last.get("test_perplexity"),
                "base_loss": initial.get("loss"), "base_perplexity": initial.get("perplexity")}

    def prepare_training_process(self) -> None:
        release_freed_memory()  # activations of tens of MB per layer: return them to the OS when freed

    def generate(self, *, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
        return generate(model=model, tokenizer=tokenizer, prompts=prompts, max_new_tokens=max_new_tokens)

    def sample_pairs(self, split: InstructionSplit, count: int) -> tuple[list[str], list[str]]:
        return split.prompts[:count], split.responses[:count]


TASK = CausalLM()
