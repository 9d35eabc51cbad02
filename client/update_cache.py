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

from fedtune.common.storage import atomic_write, load_npz, save_npz


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

    # -- secure aggregation: a paid update goes into one SecAgg+ session, never a second ---------

    def note_sent_masked(self, *, run_id: str, server_round: int) -> None:
        """Written before the masked update leaves the node: a crash after it loses the round, never
        lets the update into a second session."""
        atomic_write(self._masked_mark(run_id, server_round), b"")

    def sent_masked(self, *, run_id: str, server_round: int) -> bool:
        return self._masked_mark(run_id, server_round).is_file()

    def _masked_mark(self, run_id: str, server_round: int) -> Path:
        return self._path(run_id, server_round).with_suffix(".masked")
