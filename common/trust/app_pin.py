"""The pinned app: the Flower App Bundle (FAB) this installation would build from its own files.

`flwr build` (and `flwr run`, which builds before it submits) is deterministic: files sorted, a
fixed timestamp, a CONTENT manifest. So the sha256 of the bundle built here from the installed
checkout names exactly the code this institution runs; a run whose FAB hashes to anything else
carries other code (or other defaults in pyproject.toml) and is refused. The node never executes
the FAB's code either way: it runs its installed ClientApp (fedtune/node_runtime.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.errors import FedtuneError

INSTALLED_ROOT = Path(__file__).resolve().parents[2]  # the checkout: pyproject.toml, client/, server/, common/
SKIPPED = {".venv", ".git", "runs", ".cache", ".pytest_cache", "build", "ledgers"}  # all in .gitignore
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PinnedApp:
    sha256: str
    root: Path


@functools.lru_cache(maxsize=4)
def installed_app(root: Path = INSTALLED_ROOT) -> PinnedApp:
    """The FAB hash of the app installed at `root`, computed the way `flwr build` computes it."""
    from flwr.cli.build import build_fab_from_files  # heavy: only deployment commands need it

    if not (root / "pyproject.toml").is_file():
        raise FedtuneError(f"{root} has no pyproject.toml: the node runtime needs fedtune installed from its "
                           f"checkout (`make setup`), so it can compute the app it runs")
    return PinnedApp(sha256=hashlib.sha256(build_fab_from_files(_app_files(root))[0]).hexdigest(), root=root)


def _app_files(root: Path) -> dict[str, Path]:
    """Every file `flwr build` would consider, less the ignored folders it would walk for nothing
    (the venv alone is seconds): the same bundle, a test holds them equal."""
    files: dict[str, Path] = {}
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if not (Path(directory) == root and d in SKIPPED)]
        for name in names:
            path = Path(directory) / name
            if not path.is_symlink():
                files[path.relative_to(root).as_posix()] = path
    return files


def pin_problem(pinned_sha256: str | None, installed: PinnedApp) -> str | None:
    """Why a configured pin (`app-sha256`) cannot be honoured by this installation, or None.

    The runtime executes the installed code, so a pin naming other code could never be met: that
    is a setup error to fix before the node starts, not a run to refuse."""
    if not pinned_sha256:
        return None
    if not SHA256_PATTERN.fullmatch(pinned_sha256):
        return "app-sha256 must be 64 lowercase hex digits (the output of `fedtune app-hash`)"
    if pinned_sha256 != installed.sha256:
        return (f"app-sha256 pins {pinned_sha256[:16]}..., but the fedtune installed here builds "
                f"{installed.sha256[:16]}...; install the audited version, or pin what is installed")
    return None


def fab_problem(*, fab_hash: str, fab_content: bytes, pinned: PinnedApp) -> str | None:
    """Why a run's app is not the pinned one (one line naming both hashes), or None."""
    actual = hashlib.sha256(fab_content).hexdigest()
    if actual != fab_hash:
        return f"the run's app bundle does not match its own stated hash ({fab_hash[:16]}...); refused"
    if actual != pinned.sha256:
        return (f"the run's app {actual} is not the app this party pinned ({pinned.sha256}); "
                f"it runs only its installed, audited fedtune: nothing of the run was executed")
    return None
