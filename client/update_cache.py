"""The last update a client signed for, kept so that a re-asked round is re-sent, not retrained.

When the coordinator crashes after clients trained a round but before it checkpointed, the
resumed run asks for that round again. Training again would spend privacy twice for one
round; the client instead re-sends the very update it already paid for (post-processing of a
DP release costs nothing). The file also carries the ledger fields of that round, so a client
that crashed between caching and signing signs before anything leaves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.storage import atomic_write, load_npz, save_npz


@dataclass(frozen=True)
class CachedUpdate:
    update: list[np.ndarray]
    num_examples: int
    global_sha256: str  # the global adapter the update was computed against
    ledger_fields: dict
    metrics: dict


class UpdateCache:
    def __init__(self, ledger_dir: Path) -> None:
        self.directory = Path(ledger_dir) / "sent-updates"

    def _path(self, run_id: str, server_round: int) -> Path:
        """Named by a hash of the run id: no run id (the coordinator picks it) can make another
        run's file name, or match another run's files when this run's old rounds are dropped."""
        run = hashlib.sha256(run_id.encode()).hexdigest()[:24]
        return self.directory / f"{run}-round-{server_round}.npz"

    def save(self, *, run_id: str, server_round: int, cached: CachedUpdate) -> None:
        """Atomically store this round's update, dropping this run's earlier ones (only the
        latest round is ever re-asked); other runs sharing the ledger keep theirs."""
        meta = {"num_examples": cached.num_examples, "global_sha256": cached.global_sha256,
                "ledger_fields": cached.ledger_fields, "metrics": cached.metrics}
        target = self._path(run_id, server_round)
        save_npz(target, meta=meta, arrays=cached.update)
        prefix = target.name.rsplit("-round-", 1)[0] + "-round-"
        for old in self.directory.glob(prefix + "*"):  # earlier rounds of this run are never re-asked
            if old != target:
                old.unlink(missing_ok=True)

    def load(self, *, run_id: str, server_round: int) -> CachedUpdate | None:
        path = self._path(run_id, server_round)
        if not path.is_file():
            return None
        meta, update = load_npz(path)
        return CachedUpdate(update=update, num_examples=int(meta["num_examples"]),
                            global_sha256=meta["global_sha256"], ledger_fields=meta["ledger_fields"],
                            metrics=meta["metrics"])

    # -- secure aggregation: the one sum a paid round's update was unmasked in -------------------

    def revealed_sum(self, *, run_id: str, server_round: int) -> RevealedSum | None:
        """The sum this round's update was first unmasked in, if any."""
        path = self._path(run_id, server_round).with_suffix(".revealed.json")
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if isinstance(data, list):  # written by fedtune before sums recorded their contributors
            return RevealedSum(survivors=sorted(map(str, data)), contributors=None)
        contributors = data.get("contributors")
        return RevealedSum(survivors=sorted(map(str, data.get("survivors", []))),
                           contributors=None if contributors is None else sorted(map(str, contributors)))

    def revealed_with(self, *, run_id: str, server_round: int) -> list[str] | None:
        """The survivors (institution ids) of the sum this round's update was unmasked in, if any."""
        revealed = self.revealed_sum(run_id=run_id, server_round=server_round)
        return None if revealed is None else revealed.survivors

    def note_revealed(self, *, run_id: str, server_round: int, revealed: RevealedSum) -> None:
        """Written before the node releases its shares: a crash after it over-constrains, never under."""
        path = self._path(run_id, server_round).with_suffix(".revealed.json")
        atomic_write(path, json.dumps({"survivors": revealed.survivors,
                                       "contributors": revealed.contributors}).encode())


@dataclass(frozen=True)
class RevealedSum:
    """Who was in a sum: the survivors, and those of them that signed they contributed an update
    (None when not every survivor's statement verified, so the contributors are not known)."""

    survivors: list[str]
    contributors: list[str] | None
