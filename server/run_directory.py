"""The run directory: config.toml, run.json (the run's id), metrics.jsonl (a line per round),
checkpoint.npz, ledgers/ (in a simulation with the clients' keys and roster), adapter/, summary.json."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.flwr_run import SIMULATION_ROSTER
from fedtune.common.ledger.chain import PUBLIC_KEY_FILE, create_ledger_keys
from fedtune.common.secure_aggregation.roster import Roster, public_key_file
from fedtune.common.storage import append_line, atomic_write, json_safe

ROSTER_DAYS = 30  # a simulation's roster is rewritten (same keys, new date) whenever it starts or resumes


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



def write_simulation_roster(ledger_root: Path, *, num_clients: int) -> Path:
    """One researcher holds every node of a simulation (`fedtune simulate`, or `flwr run` on a
    simulation federation): it makes each client's identity (ledger) key and the roster pinning
    them, as institutions would out of band (`fedtune roster build`)."""
    members = {}
    for partition in range(num_clients):
        directory = ledger_root / f"client-{partition}"
        if not (directory / PUBLIC_KEY_FILE).exists():
            create_ledger_keys(directory)
        members[f"client-{partition}"] = public_key_file(directory / PUBLIC_KEY_FILE)
    roster = Roster.of_members(members, federation="simulation",
                               expires=dt.date.today() + dt.timedelta(days=ROSTER_DAYS))
    roster.write(ledger_root / SIMULATION_ROSTER)
    return ledger_root / SIMULATION_ROSTER
