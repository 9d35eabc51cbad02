"""A tiny BERT (2 layers, 32 wide) with MiniLM's tokenizer, saved as a real HF model folder.

Benchmarks of the federation's machinery (SecAgg+, many clients) and the tests use it, so that
what is measured is the protocol and the orchestration, not a backbone's matrix multiplies.
"""

from __future__ import annotations

from pathlib import Path


def save_tiny_bert(folder: Path) -> Path:
    """Write the tiny model to `folder` (loaded back through `from_pretrained` like any model)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedtune.common.tasks import resolve_model_path

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("default")))
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(str(folder))
    return folder


def steady_round_seconds(rounds: list[dict]) -> float:
    """Mean seconds of rounds 2..n: round 1 also pays for actor start-up, model load and
    tokenization, and privacy calibration, which are not the per-round cost being compared."""
    later = [r["seconds"] for r in rounds[1:]] or [r["seconds"] for r in rounds]
    return sum(later) / len(later)


def tiny_job(folder: Path) -> dict[str, object]:
    """Run-config keys of the machinery benchmarks: the tiny model on BBC News, max-length 32,
    DP-SGD at the default budget, one local epoch, 3 rounds, LoRA rank 4."""
    return {"model": str(save_tiny_bert(folder)), "data": "bbc-news", "max-length": 32, "num-rounds": 3,
            "dp": True, "lora-rank": 4, "lora-variant": "lora", "training-mode": "adapter"}
