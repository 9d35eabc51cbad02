"""Load prompt/response pairs for instruction fine-tuning (task = "causal-lm") and clean them.

Sources: the packaged chatterbot-corpus (English, 21 categories, read from its YAML files
without importing the package) or a user's CSV/JSONL/Parquet file with `prompt`/`response`
columns (names configurable) or Alpaca-style `instruction`/`input`/`output`. An optional
`category` column gives the `category` partitioner something to split by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.data.files import BBC_NEWS, CHATTERBOT, DEFAULT_DATA, packaged_folder, read_records
from fedtune.common.data.labelled import label_order
from fedtune.common.errors import FedtuneError

log = logging.getLogger(__name__)

CATEGORY_COLUMN = "category"
UNCATEGORISED = "all"


@dataclass(frozen=True)
class InstructionSplit:
    """One party's prompt/response pairs; `labels` are category indices (for partitioning)."""

    prompts: list[str]
    responses: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class InstructionPairs:
    """Clean pairs of a whole corpus. Shaped like `LabelledTexts` so the same splitting and
    partitioning code serves both tasks: categories play the part of labels."""

    prompts: list[str]
    responses: list[str]
    labels: list[int]
    label_names: list[str]
    source: str
    dropped_empty: int = 0
    dropped_duplicate: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices) -> InstructionSplit:
        return InstructionSplit(prompts=[self.prompts[i] for i in indices],
                                responses=[self.responses[i] for i in indices],
                                labels=[self.labels[i] for i in indices])

    def cleaning_report(self) -> str:
        return (f"{self.source}: {len(self)} prompt/response pairs in {len(self.label_names)} "
                f"categor{'y' if len(self.label_names) == 1 else 'ies'}; dropped {self.dropped_empty} "
                f"empty and {self.dropped_duplicate} duplicate pairs")


def load_instruction_pairs(*, data: str, prompt_column: str = "prompt",
                           response_column: str = "response") -> InstructionPairs:
    """Read `data` ('default'/'chatterbot' or a CSV/JSONL/Parquet path) and clean it."""
    if data in (DEFAULT_DATA, CHATTERBOT):
        return _clean(_read_chatterbot(), source="chatterbot-corpus English (packaged)")
    if data == BBC_NEWS:
        raise FedtuneError("data 'bbc-news' is a classification corpus; task 'causal-lm' needs prompt/response "
                           "pairs: data = \"chatterbot\" or a file with prompt/response columns")
    records, columns = read_records(Path(data))
    if prompt_column in columns and response_column in columns:
        rows = [(r.get(prompt_column), r.get(response_column), r.get(CATEGORY_COLUMN)) for r in records]
    elif "instruction" in columns and "output" in columns:
        rows = [(_alpaca_prompt(r.get("instruction"), r.get("input")), r.get("output"), r.get(CATEGORY_COLUMN))
                for r in records]
    else:
        raise FedtuneError(f"{data} has neither '{prompt_column}'/'{response_column}' columns (set prompt-column "
                           f"and response-column) nor Alpaca-style instruction/input/output columns; columns "
                           f"found: {', '.join(map(str, columns)) or 'none'}")
    return _clean(rows, source=str(data))


def chatterbot_dir() -> Path:
    """The packaged English corpus folder, found without importing the package."""
    return packaged_folder("chatterbot_corpus", "data", "english", what="the chatterbot corpus",
                           requirement="chatterbot-corpus==1.3.3")


def _read_chatterbot() -> list[tuple[object, object, object]]:
    """Each conversation alternates user and bot turns: turns (0, 1), (2, 3), ... are pairs."""
    import yaml  # pyyaml; only this corpus needs it

    rows = []
    for path in sorted(chatterbot_dir().glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = (document.get("categories") or [path.stem])[0]
        for turns in document.get("conversations") or []:
            for i in range(0, len(turns) - 1, 2):
                rows.append((turns[i], turns[i + 1], category))
    return rows


def _alpaca_prompt(instruction: object, extra: object) -> object:
    if extra is None or not str(extra).strip():
        return instruction
    return f"{'' if instruction is None else str(instruction).strip()}\n\n{str(extra).strip()}"


def _clean(rows: list[tuple[object, object, object]], *, source: str) -> InstructionPairs:
    """Strip both sides, drop empty and duplicate pairs, index categories in sorted order."""
    seen: set[tuple[str, str]] = set()
    kept: list[tuple[str, str, str]] = []
    empty = duplicate = 0
    for raw_prompt, raw_response, raw_category in rows:
        prompt = "" if raw_prompt is None else str(raw_prompt).strip()
        response = "" if raw_response is None else str(raw_response).strip()
        category = UNCATEGORISED if raw_category is None or not str(raw_category).strip() else str(raw_category).strip()
        if not prompt or not response:
            empty += 1
        elif (prompt, response) in seen:
            duplicate += 1
        else:
            seen.add((prompt, response))
            kept.append((prompt, response, category))
    if not kept:
        raise FedtuneError(f"{source}: no prompt/response pairs left after cleaning ({empty} empty, "
                           f"{duplicate} duplicate rows dropped); check the prompt and response columns")
    names = sorted({c for _, _, c in kept}, key=label_order)
    index = {name: i for i, name in enumerate(names)}
    result = InstructionPairs(prompts=[p for p, _, _ in kept], responses=[r for _, r, _ in kept],
                              labels=[index[c] for _, _, c in kept], label_names=names, source=source,
                              dropped_empty=empty, dropped_duplicate=duplicate)
    log.info(result.cleaning_report())
    return result
