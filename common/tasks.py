"""What differs between the two tasks, in one place: how a split becomes tensors and how a
model is scored. Everything else (privacy, aggregation, ledgers) is shared."""

from __future__ import annotations

from torch.utils.data import TensorDataset

CAUSAL_LM = "causal-lm"


def encode_split(*, task: str, tokenizer, split, max_length: int) -> TensorDataset:
    """(input_ids, attention_mask, labels): a label per text, or response-only token labels."""
    if task == CAUSAL_LM:
        from common.chat_tokens import encode_pairs

        return encode_pairs(tokenizer=tokenizer, split=split, max_length=max_length)
    from common.tokens import encode

    return encode(tokenizer=tokenizer, split=split, max_length=max_length)


def evaluate_model(*, task: str, model, dataset: TensorDataset) -> dict[str, float]:
    """{loss, accuracy, macro_f1} for classification; {loss, perplexity} for causal-lm."""
    if task == CAUSAL_LM:
        from common.causal_lm import evaluate_causal_lm

        return evaluate_causal_lm(model=model, dataset=dataset)
    from common.evaluation import evaluate_classifier

    return evaluate_classifier(model=model, dataset=dataset)
