"""Prompt/response pairs as training tensors: the tokenizer's chat template, loss on response
tokens only, truncation that never cuts a response away entirely.

Tokens are (input_ids, attention_mask, labels) in a TensorDataset, right-padded; `labels` is
-100 on the prompt and on padding, so only what the assistant says is learned (and measured).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch.utils.data import TensorDataset

from fedtune.common.data.instructions import InstructionPairs, InstructionSplit
from fedtune.common.errors import FedtuneError
from fedtune.common.models.causal_lm import IGNORE

log = logging.getLogger(__name__)

# For a tokenizer without a chat template (a base model): a plain instruction format.
FALLBACK_PROMPT = "### Prompt:\n{prompt}\n\n### Response:\n"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The tokens a generation starts from: the prompt and the assistant's turn header."""
    return tokenizer(_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def pair_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens) with the response's end-of-turn marker included.

    The two halves are tokenized separately and concatenated, so the mask boundary is exact.
    """
    head = _prompt_text(tokenizer, prompt)
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise FedtuneError("the tokenizer's chat template renders a conversation that does not begin with "
                               "its own generation prompt; use a model whose template does, or remove it")
        tail = full[len(head):]
        end = tail.rfind(tokenizer.eos_token) if tokenizer.eos_token else -1
        if end >= 0:  # learn to stop at end-of-turn, not what the template prints after it
            tail = tail[:end + len(tokenizer.eos_token)]
    else:
        tail = response + (tokenizer.eos_token or "")
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def _prompt_text(tokenizer, prompt: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return (tokenizer.bos_token or "") + FALLBACK_PROMPT.format(prompt=prompt)


def keep_fitting(pairs: InstructionPairs, *, tokenizer, max_length: int) -> InstructionPairs:
    """Drop (and count) pairs whose prompt alone fills `max_length`: nothing of the response
    would be left to learn. Longer responses are kept and truncated later."""
    keep = [i for i, prompt in enumerate(pairs.prompts) if len(prompt_ids(tokenizer, prompt)) < max_length]
    dropped = len(pairs) - len(keep)
    if not keep:
        raise FedtuneError(f"{pairs.source}: every prompt is at least max-length={max_length} tokens long "
                           f"once templated, so no response token would be trained; raise max-length")
    if dropped:
        log.warning("%s: dropped %d of %d pairs whose prompt alone is max-length=%d tokens or longer; "
                    "raise max-length to keep them", pairs.source, dropped, len(pairs), max_length)
    kept = pairs.take(keep)
    return replace(pairs, prompts=kept.prompts, responses=kept.responses, labels=kept.labels,
                   source=f"{pairs.source} ({dropped} with a prompt longer than max-length dropped)"
                   if dropped else pairs.source)


def encode_pairs(*, tokenizer, split: InstructionSplit, max_length: int) -> TensorDataset:
    """Right-padded ids, mask and response-only labels, each pair cut to `max_length`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise FedtuneError("the tokenizer has neither a pad nor an end-of-sequence token; a causal LM for "
                           "instruction tuning needs an end-of-sequence token to learn where a response stops")
    rows: list[tuple[list[int], list[int]]] = []
    truncated = 0
    for prompt, response in zip(split.prompts, split.responses, strict=True):
        head, tail = pair_ids(tokenizer, prompt, response)
        room = max_length - len(head)
        if room < 1:
            raise FedtuneError(f"a prompt is {len(head)} tokens once templated, at least max-length="
                               f"{max_length}: no response token would be trained; raise max-length "
                               f"(prompt begins {prompt[:60]!r})")
        truncated += len(tail) > room
        rows.append((head, tail[:room]))
    if truncated:
        log.info("%d of %d responses cut to fit max-length=%d", truncated, len(rows), max_length)
    width = max((len(h) + len(t) for h, t in rows), default=1)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (head, tail) in enumerate(rows):
        n = len(head) + len(tail)
        ids[i, :n] = torch.tensor(head + tail)
        mask[i, :n] = 1
        labels[i, len(head):n] = torch.tensor(tail)
    return TensorDataset(ids, mask, labels)
