"""A billion-parameter Llama with random weights, built from a config and saved once.

No 1B model can be downloaded here, and memory and step time depend on the architecture's shapes,
not on the weights' values. So the benchmarks build a Llama-3.2-1B-shaped model (16 layers,
2048 wide, grouped-query attention, an 8192-wide MLP) with SmolLM2's tokenizer (vocabulary
49,152: 1.07B parameters), save it in bf16 to the fedtune cache, and load it back through
`from_pretrained` like any user's folder. Run `python -m benchmarks.random_llama` to build it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

SHAPES = {  # name -> LlamaConfig fields; "1b" follows Llama-3.2-1B's shapes
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
}


def random_llama_folder(size: str = "1b", *, cache: Path | None = None) -> Path:
    """The folder of the random Llama of `size`, built on first use (about a minute for 1b) and
    reused after; written to a staging folder and renamed, so a half-built one is never seen."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.common.models.smollm2 import cache_root, gguf_path

    folder = (cache or cache_root()) / f"random-llama-{size}"
    if (folder / "config.json").is_file():
        return folder
    print(f"building a random {size} Llama in {folder} (first use only)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        gguf = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(staging))
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **SHAPES[size])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(staging))
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            total += sum(_numel(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return total


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


if __name__ == "__main__":
    built = random_llama_folder()
    print(f"{built}: {parameter_count(built) / 1e9:.2f}B parameters")
