"""Local Hugging Face model folders: nothing is downloaded from a hub."""

from __future__ import annotations

from pathlib import Path

from fedtune.common.errors import FedtuneError


def check_model_folder(path: Path) -> Path:
    """`path` if it holds a model (config.json), else an error saying what `model` must be."""
    if not (path / "config.json").is_file():
        raise FedtuneError(f"model folder {path} has no config.json; point `model` at a local "
                           f"Hugging Face model folder (nothing is downloaded from a hub)")
    return path


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer  # heavy: loaded when a model is used

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:  # decoder-only models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
