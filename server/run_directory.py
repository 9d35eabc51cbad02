"""The run directory: config.toml, run.json (the run's id), metrics.jsonl (a line per round),
checkpoint.npz, ledgers/, adapter/, summary.json."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

from common.config import RunConfig
from common.errors import FedtuneError
from common.storage import append_line, atomic_write, json_safe


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
        atomic_write(path / "config.toml", config.to_toml())
        # A fedtune run id: unlike Flower's run id it survives a resume, so clients can tell a
        # round they already paid for from a new one.
        atomic_write(path / "run.json", json.dumps({"run_id": uuid.uuid4().hex}) + "\n")
        return cls(path)

    @classmethod
    def open_existing(cls, path: Path) -> RunDirectory:
        """A run directory to resume: it must hold the config and id a run was started with."""
        path = Path(path)
        for name in ("config.toml", "run.json"):
            if not (path / name).is_file():
                raise FedtuneError(f"{path} is not a fedtune run directory to resume (no {name})")
        if (path / "summary.json").is_file():
            raise FedtuneError(f"{path} holds a finished run (summary.json exists); nothing to resume")
        return cls(path)

    @property
    def run_id(self) -> str:
        try:
            return str(json.loads((self.path / "run.json").read_text(encoding="utf-8"))["run_id"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FedtuneError(f"{self.path / 'run.json'} is unreadable ({exc})") from None

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def append_round(self, record: dict) -> None:
        append_line(self.path / "metrics.jsonl", json.dumps(json_safe(record), sort_keys=False))

    def rewrite_rounds(self, records: list[dict]) -> None:
        """Replace metrics.jsonl (on resume: exactly the rounds the checkpoint holds)."""
        atomic_write(self.path / "metrics.jsonl",
                     "".join(json.dumps(json_safe(r), sort_keys=False) + "\n" for r in records))

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.path / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")

    def read_rounds(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

