"""One signed job, one run: a party binds a job id to the first Flower run that carries it, so a
verbatim copy of a signed job submitted again (by anyone) is refused rather than trained twice."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from common.errors import FedtuneError
from common.storage import atomic_write

BINDINGS_FILE = "jobs.json"
_lock = threading.Lock()


def bind_problem(directory: Path, *, job_id: str, run_id: int) -> str | None:
    """Bind `job_id` to `run_id` in `directory/jobs.json`; why not (a replay), or None."""
    path = Path(directory) / BINDINGS_FILE
    with _lock:
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
        if first is None:
            bound[job_id] = run_id
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(bound, indent=1, sort_keys=True))
        return None
