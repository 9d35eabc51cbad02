"""One signed job, one run: a party binds a job id to the first Flower run that carries it, so a
verbatim copy of a signed job submitted again (by anyone: `flwr ls` shows every run's config) is
refused rather than trained twice. The read-modify-write holds an exclusive file lock, so two
processes binding at once (the coordinator runs each ServerApp in its own) cannot both win."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.storage import atomic_write

BINDINGS_FILE, LOCK_FILE = "jobs.json", "jobs.lock"


def bind_problem(directory: Path, *, job_id: str, run_id: int, refuse_new: str | None = None) -> str | None:
    """Bind `job_id` to `run_id` in `directory/jobs.json`; why not (a replay, or `refuse_new` for a
    job not bound yet: an expired one may finish its run, not start another), or None."""
    path = Path(directory) / BINDINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            bound = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as exc:
            raise FedtuneError(f"{path} is unreadable ({type(exc).__name__}); restore it from backup: "
                               f"it is what stops a signed job from running twice") from None
        if not isinstance(bound, dict):
            raise FedtuneError(f"{path} is not a JSON object; restore it from backup")
        first = bound.get(job_id)
        if first is not None and first != run_id:
            return f"signed job {job_id} already ran as run {first}: a signed job runs once; ask for a new signature"
        if first is None and refuse_new:
            return refuse_new
        if first is None:
            bound[job_id] = run_id
            atomic_write(path, json.dumps(bound, indent=1, sort_keys=True))
        return None
