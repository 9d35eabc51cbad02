"""Shared fixtures: a tiny BERT saved as a real HF folder, and small labelled data files.

The tiny model goes through the same `from_pretrained` path users take, so tests exercise the
real loading, LoRA and Opacus code at a fraction of the cost of MiniLM.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per test process and per process it starts, as Ray gives each simulated client:
# for models this small a second thread only spins. `make test` runs two test processes side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)

TOPICS = {
    "sport": "match team goal coach league player score season cup win".split(),
    "markets": "stock price shares market investors bank profit trade economy rate".split(),
    "politics": "election vote party minister parliament campaign policy government law leader".split(),
}
FILLER = "the a of and to in on with for said was has this that it by at from".split()


def make_texts(n_per_label: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """Short synthetic articles whose topic words reveal the label (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        for _ in range(n_per_label):
            tokens = [rng.choice(words) for _ in range(6)] + [rng.choice(FILLER) for _ in range(6)]
            rng.shuffle(tokens)
            rows.append((" ".join(tokens), label))
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], *, header=("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved with save_pretrained."""
    from benchmarks.tiny_model import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


CHAT_TOPICS = {
    "weather": ("What is the weather like in {x}?", "It is sunny and warm in {x} today."),
    "food": ("What should I cook with {x}?", "A simple soup with {x} is a good choice."),
    "travel": ("How do I get to {x}?", "Take the morning train to {x}, it is the fastest way."),
}
PLACES = ("Paris Lima Oslo Rome Cairo Delhi Quito Seoul Berlin Dakar Hanoi Perth Tunis Riga Sofia Lagos "
          "Minsk Dublin Havana Kyoto").split()


def make_chat_pairs() -> list[dict]:
    """Prompt/response pairs in three categories whose response patterns a small LoRA learns."""
    return [{"prompt": ask.format(x=x), "response": say.format(x=x), "category": topic}
            for topic, (ask, say) in CHAT_TOPICS.items() for x in PLACES]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama with SmolLM2's tokenizer (chat template included), read straight
    from the packaged GGUF file, and saved with save_pretrained like any user's model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.common.models.smollm2 import gguf_path

    folder = tmp_path_factory.mktemp("tiny-llama")
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(folder))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    """60 prompt/response pairs in 3 categories."""
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", make_chat_pairs())


@pytest.fixture(scope="session")
def tiny_lm_config(tiny_causal_lm_dir, chat_jsonl):
    """A factory for causal-lm run configs on the tiny Llama and the chat pairs."""
    from fedtune.common.config import RunConfig

    def make(**changes):
        base = RunConfig(task="causal-lm", model=str(tiny_causal_lm_dir), data=str(chat_jsonl), num_clients=3,
                         clients_per_round=3, num_rounds=2, batch_size=8, max_length=64, learning_rate=0.02,
                         lora_rank=4, target_epsilon=8.0, partitioner="category", test_fraction=0.15,
                         samples=2, max_new_tokens=8, lora_variant="lora")
        return base.with_overrides(**changes)

    return make


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """600 synthetic examples over 3 labels."""
    return write_csv(tmp_path_factory.mktemp("data") / "topics.csv", make_texts(200))


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir, tiny_csv):
    """A factory for run configs on the tiny model and data; keyword overrides are snake_case."""
    from fedtune.common.config import RunConfig

    def make(**changes):
        base = RunConfig(model=str(tiny_model_dir), data=str(tiny_csv), num_clients=2, clients_per_round=2,
                         num_rounds=3, batch_size=16, max_length=24, learning_rate=0.01, lora_rank=4,
                         target_epsilon=4.0, lora_variant="lora", head_learning_rate=0.05, training_mode="adapter")
        return base.with_overrides(**changes)

    return make


def initial_adapter(config):
    """The global adapter a server would send in round 1 for `config`."""
    from fedtune.common.models.adapter import adapter_to_arrays
    from fedtune.common.models.classifier import build_lora_classifier
    from fedtune.common.models.lora import LoraSettings
    from fedtune.common.tasks import resolve_model_path
    from fedtune.common.run_data import federated_splits

    model = build_lora_classifier(model_path=resolve_model_path(config.model),
                                  num_labels=len(federated_splits(config).label_names),
                                  lora=LoraSettings.from_config(config),
                                  seed=config.seed)
    return adapter_to_arrays(model)


class FinishedRun(NamedTuple):
    """A finished run (`path`), its config, and a copy of its directory as it was after round 2."""

    config: object
    path: Path
    after_round_2: Path


FINISHED_CLIENTS = ("client-0", "client-1", "client-2")


@pytest.fixture(scope="session")
def finished_dp_run(tiny_config, tmp_path_factory) -> FinishedRun:
    """ONE finished 3-client, 3-round DP-SGD + SecAgg+ federation of the tiny model (target epsilon 5),
    made once per session in this process (simulations/inprocess.py: the real round loop, ServerApp
    and ClientApps with every mod), and its directory as it was after round 2 (what a roll-back to
    round 2 leaves behind). Read it only: a test that edits a run takes `finished_dp_run_copy`."""
    import shutil

    from fedtune.simulations import inprocess

    config = tiny_config(num_clients=3, clients_per_round=3, num_rounds=3, target_epsilon=5.0, dp=True,
                         secure_aggregation=True)
    root = tmp_path_factory.mktemp("finished-dp-run")
    grid, run_dir = inprocess.federation(config, root / "run")
    snapshot = root / "after-round-2"

    def keep_round_2(record: dict) -> None:
        if record["round"] == 2:
            shutil.copytree(run_dir.path, snapshot)

    inprocess.run(grid, config, run_dir, on_round=keep_round_2)
    return FinishedRun(config=config, path=run_dir.path, after_round_2=snapshot)


@pytest.fixture
def finished_dp_run_copy(finished_dp_run, tmp_path) -> Path:
    """A copy of `finished_dp_run`'s directory in this test's tmp_path, to tamper with."""
    import shutil

    return Path(shutil.copytree(finished_dp_run.path, tmp_path / "run-copy"))


# The files that take longest (real deployments, the Ray runs), measured with --durations: started first.
LONGEST_FILES = ("test_pinned_deployment.py", "test_readme_deployment.py", "test_simulation.py",
                 "test_mechanism_check.py", "test_control_api.py", "test_linear_probing.py", "test_wheel.py",
                 "test_quantization.py", "test_process_cleanup.py", "test_flwr_run.py", "test_cli_behaviour.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the others with slow tests, then the rest; each file's tests
    kept together and in order. `make test`'s three processes then end together instead of one of
    them finishing a long file alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    first_seen = {}
    for item in items:
        first_seen.setdefault(item.path, len(first_seen))

    def rank(item) -> tuple:
        name = item.path.name
        longest = LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
        return longest, item.path not in slow_files, first_seen[item.path]

    items.sort(key=rank)
