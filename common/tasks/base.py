"""What a task is: everything that differs between training a classifier and a causal LM.

Privacy, aggregation, ledgers and audit are the same for every task; a task says how its data
is read, how a model is built, encoded for, trained on (the loss) and scored. Adding a task is
one new module implementing `Task` and one line in `common/tasks/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from fedtune.common.models.loading import check_model_folder

DEFAULT_MODEL = "default"


class Task(ABC):
    name: ClassVar[str]  # the config value, e.g. "classification"
    score_names: ClassVar[tuple[str, ...]]  # what `evaluate` returns besides "loss"
    headline_metric: ClassVar[str]  # the score the audit report plots per round
    # (header, metrics.jsonl key, format) of the task's columns in the progress table
    progress_columns: ClassVar[tuple[tuple[str, str, str], ...]]
    # What `evaluate` also returns on the coordinator's own test split, never asked of a node (a node
    # sends `score_names` alone): how the predictions are spread, for the round table's warnings.
    test_diagnostics: ClassVar[tuple[str, ...]] = ()
    default_physical_batch: ClassVar[int] = 0  # examples per forward pass when unset (0: whole batch)

    # -- model ---------------------------------------------------------------------------------

    @abstractmethod
    def default_model_folder(self) -> Path:
        """The packaged model used when `model = "default"`."""

    def check_model(self, path: Path) -> None:
        """Refuse a model folder this task cannot train, saying why (all folders by default)."""

    def model_path(self, model: str) -> Path:
        """'default' is the task's packaged model; anything else must be a local HF folder."""
        path = self.default_model_folder() if model == DEFAULT_MODEL else Path(model)
        check_model_folder(path)
        self.check_model(path)
        return path

    @abstractmethod
    def build_model(self, *, model_path: Path, num_labels: int, lora, seed: int, head=None, profile=None,
                    resident: bool = False):
        """The frozen base model with LoRA attached (and a head, where the task has one); `head`
        (HeadSettings) says how a classifier reads its encoder; `profile` (ExecutionProfile) where
        and in what precision it runs. `resident`: the process's one model for this build, reset
        per call (a client's, per message); else a model of the caller's own over the same base
        tensors (a coordinator's, a test's)."""

    # -- data ----------------------------------------------------------------------------------

    @abstractmethod
    def data_columns(self, source) -> tuple[str, str]:
        """The two columns a user file must have, read from a run config or a node's settings."""

    @abstractmethod
    def load_examples(self, *, data: str, columns: tuple[str, str], model: str, max_length: int):
        """A whole corpus, cleaned: `LabelledTexts` or `InstructionPairs`."""

    def align_labels(self, examples, *, label_names: tuple[str, ...], source: str):
        """A node's own examples indexed by the federation's label order (nothing to do by default)."""
        return examples

    @abstractmethod
    def encode(self, *, tokenizer, split, max_length: int):
        """A split as a TensorDataset of (input_ids, attention_mask, labels)."""

    # -- training and scoring ------------------------------------------------------------------

    @abstractmethod
    def loss(self, model, input_ids, attention_mask, labels):
        """The mean over examples of a per-example loss (DP-SGD clips each example's gradient)."""

    @abstractmethod
    def evaluate(self, *, model, dataset) -> dict[str, float]:
        """{"loss": ..., **{name: ... for name in score_names}} on `dataset`."""

    @abstractmethod
    def summary_scores(self, *, last: dict[str, Any], initial: dict[str, Any]) -> dict[str, Any]:
        """The scores summary.json reports: the last round's, and the initial adapter's."""

    def prepare_training_process(self) -> None:
        """Called once before local training in a process (nothing by default)."""


class GeneratesText(ABC):
    """A task whose model writes text: the coordinator shows base and fine-tuned generations for
    fixed held-out prompts in samples.md. A task without it has no samples."""

    @abstractmethod
    def generate(self, *, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of `prompts` (deterministic, so base and fine-tuned compare fairly)."""

    @abstractmethod
    def sample_pairs(self, split, count: int) -> tuple[list[str], list[str]]:
        """The first `count` (prompt, reference response) pairs of a held-out split."""
