"""Reading the files a user brings (CSV, JSONL, Parquet) and the offline packages fedtune ships
with (located on disk, never imported: their imports are slow or need what is not installed)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

from common.errors import FedtuneError

DEFAULT_DATA = "default"  # the packaged corpus of the run's task
BBC_NEWS = "bbc-news"  # labelled news articles (classification)
CHATTERBOT = "chatterbot"  # question/answer pairs (causal-lm)
SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".parquet")


def packaged_folder(module: str, *parts: str, what: str, requirement: str) -> Path:
    """A folder inside an installed offline package, located with find_spec (never imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(f"{what} is not installed; run `make setup` (it installs {requirement} with --no-deps)")
    folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not folder.exists():
        raise FedtuneError(f"{requirement.split('==')[0]} is installed but {folder} is missing; reinstall it")
    return folder


def read_records(path: Path) -> tuple[list[dict], list[str]]:
    """A user's CSV, JSONL or Parquet file as rows (dicts) and its column names."""
    if not path.is_file():
        raise FedtuneError(f"data file not found: {path} (set data = \"default\" for the packaged corpus or a "
                           f"path to a {'/'.join(SUPPORTED_SUFFIXES)} file)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise FedtuneError(f"unsupported data file type '{suffix}' for {path}; "
                       f"use one of {', '.join(SUPPORTED_SUFFIXES)}")


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            records = list(reader)
            return records, list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FedtuneError(f"cannot read CSV file {path}: {exc}") from None


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    records: list[dict] = []
    columns: dict[str, None] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedtuneError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise FedtuneError(f"{path} line {number} is not a JSON object")
            records.append(record)
            columns.update(dict.fromkeys(record))
    return records, list(columns)


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq  # installed with `datasets`; imported late, it is heavy

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise FedtuneError(f"cannot read Parquet file {path}: {exc}") from None
    return table.to_pylist(), list(table.column_names)
