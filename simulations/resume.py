"""`fedtune simulate --resume`: the config an interrupted run continues with."""

from __future__ import annotations

from pathlib import Path

from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.server.run_directory import RunDirectory

# Keys a resumed run may change: how the drill and the waiting go, never what is trained or how
# privately. Everything else comes from the run directory's config.toml.
RESUMABLE_OVERRIDES = ("inject-faults", "round-timeout")


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The config an interrupted run was started with, plus the few overrides a resume allows."""
    RunDirectory.open_existing(run_dir)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUMABLE_OVERRIDES:
            raise FedtuneError(f"--resume keeps the run's config; only {', '.join(RESUMABLE_OVERRIDES)} "
                               f"may change (got '{key}')")
    return RunConfig.load(path=run_dir / "config.toml", overrides=overrides)
