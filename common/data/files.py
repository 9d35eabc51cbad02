"""Reading the files a user brings (CSV, JSONL, Parquet) and the offline packages fedtune ships
with (located on disk, never imported: their imports are slow or need what is not installed)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

from fedtune.common.errors import FedtuneError

DEFAULT_DATA = "default"  # the packaged corpus of the run's task
BBC_NEWS = "bbc-news"  # labelled news articles (classification)
CHATTERBOT = "chatterbot"  # question/answer pairs (causal-lm)
SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
# Python's csv module stops at 128 KiB per field; a long document is a normal text (it is cut to
# max-length tokens later). 64 MiB still stops a file that is not a CSV at all from filling memory.
CSV_FIELD_LIMIT = 64 * 1024 * 1024


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
    kinds = "/".join(SUPPORTED_SUFFIXES)
    if path.is_dir():
        raise FedtuneError(f"data {path} is a directory; give one {kinds} file (or data = \"default\" for the "
                           f"packaged corpus)")
    if not path.is_file():
        raise FedtuneError(f"data file not found: {path} (set data = \"default\" for the packaged corpus or a "
                           f"path to a {kinds} file)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise FedtuneError(f"unsupported data file type '{suffix}' for {path}; "
                       f"use one of {', '.join(SUPPORTED_SUFFIXES)}")


def _read_csv(path: Path, *, delimiter: str) -> tuple[list[dict], list[str]]:
    """A comma- (.csv) or tab-separated (.tsv) file with a header row."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = list(reader.fieldnames or [])
            if delimiter == "," and len(columns) == 1:
                _check_separator(path, columns[0])
            return list(reader), columns
    except UnicodeDecodeError:
        raise FedtuneError(f"cannot read {kind} file {path}: it is not UTF-8 text; save it as UTF-8") from None
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise FedtuneError(f"{kind} file {path} line {reader.line_num} has a field over "
                               f"{CSV_FIELD_LIMIT // 2**20} MiB; is it really {kind}? (split such texts, or "
                               f"use a .jsonl or .parquet file)") from None
        raise FedtuneError(f"cannot read {kind} file {path} (line {reader.line_num}): {exc}") from None


def _check_separator(path: Path, header: str) -> None:
    """A one-column header that holds tabs or semicolons: the file is not comma-separated."""
    if "\t" in header:
        raise FedtuneError(f"{path} is tab-separated (its header has {header.count(chr(9))} tab(s) and no "
                           f"comma); rename it to {path.with_suffix('.tsv').name}")
    if ";" in header:
        raise FedtuneError(f"{path} is semicolon-separated (its header has no comma); save it comma-separated, "
                           f"or as .tsv, .jsonl or .parquet")


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
