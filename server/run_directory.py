"""The run directory: config.toml, metrics.jsonl (a line per round), adapter/, summary.json."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from common.config import RunConfig
from common.errors import FedtuneError
from common.json_safe import json_safe


def default_run_dir() -> Path:
    return Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, *, path: Path, config: RunConfig) -> RunDirectory:
        path = Path(path)
        if (path / "metrics.jsonl").exists():
            raise FedtuneError(f"{path} already holds a run; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / "config.toml", config.to_toml())
        return cls(path)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def append_round(self, record: dict) -> None:
        with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")

    def read_rounds(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
