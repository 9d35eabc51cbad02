"""samples.md: greedy generations for fixed held-out prompts, base model and fine-tuned side by
side, so a reader sees what the numbers mean. Written before round 1 (base only) and again
after the last round."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtune.common.models.adapter import arrays_to_adapter
from fedtune.common.storage import atomic_write
from fedtune.common.tasks.base import GeneratesText


class SampleWriter:
    """Generates for the first `count` test prompts; the adapter decides base vs fine-tuned."""

    def __init__(self, *, task: GeneratesText, model, tokenizer, prompts: list[str], references: list[str],
                 max_new_tokens: int, path: Path) -> None:
        self.task, self.model, self.tokenizer, self.max_new_tokens, self.path = (task, model, tokenizer,
                                                                                 max_new_tokens, path)
        self.prompts, self.references = prompts, references
        self.base: list[str] = []

    def write_base(self, initial: list[np.ndarray]) -> None:
        """LoRA B starts at zero, so the initial adapter *is* the base model's behaviour."""
        self.base = self._generate(initial)
        self._write(fine_tuned=None, after_round=None)

    def write_final(self, arrays: list[np.ndarray], *, after_round: int) -> None:
        self._write(fine_tuned=self._generate(arrays), after_round=after_round)

    def _generate(self, arrays: list[np.ndarray]) -> list[str]:
        arrays_to_adapter(self.model, arrays)
        return self.task.generate(model=self.model, tokenizer=self.tokenizer, prompts=self.prompts,
                        max_new_tokens=self.max_new_tokens)

    def _write(self, *, fine_tuned: list[str] | None, after_round: int | None) -> None:
        heading = (f"fine-tuned (after round {after_round})" if after_round is not None
                   else "fine-tuned (pending: written after the last round)")
        lines = ["# Samples: base model and fine-tuned adapter on held-out prompts", "",
                 f"Greedy decoding, at most {self.max_new_tokens} new tokens; the prompts are the first "
                 f"{len(self.prompts)} of the server's test split.", ""]
        for i, (prompt, reference) in enumerate(zip(self.prompts, self.references, strict=True)):
            lines += [f"## {i + 1}. {_one_line(prompt)}", "", f"**reference:** {_one_line(reference)}", "",
                      f"**base model:** {_one_line(self.base[i])}", "",
                      f"**{heading}:** {_one_line(fine_tuned[i]) if fine_tuned else '-'}", ""]
        atomic_write(self.path, "\n".join(lines))


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(empty)"
