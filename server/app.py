"""The fedtune ServerApp.

`app` is what `flwr run` loads (server/flwr_run.py: config from the Flower run config, outputs
under runs/, the round table and summary printed); `build_server_app` binds a resolved config,
run directory and progress callback, as `fedtune simulate` uses it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common.config import RunConfig
from fedtune.server.federation import run_federation
from fedtune.server.flwr_run import run_flwr_job
from fedtune.server.recorder import RoundCallback
from fedtune.server.run_directory import RunDirectory, default_run_dir


def build_server_app(*, config: RunConfig | None = None, run_dir: Path | None = None,
                     on_round: RoundCallback | None = None, results: dict | None = None,
                     resume: bool = False) -> ServerApp:
    """`results`, when given, receives the run summary under the key 'summary'; with `resume`,
    `run_dir` is an interrupted run to continue from its checkpoint."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:  # `flwr run`: the job is Flower's run config
            run_flwr_job(grid=grid, context=context)
            return
        if resume:
            directory = RunDirectory.open_existing(run_dir)
        else:
            directory = RunDirectory.create(path=run_dir or Path(config.output_dir or default_run_dir()), config=config)
        summary = run_federation(grid=grid, context=context, config=config, run_dir=directory, on_round=on_round,
                                 resume=resume)
        if results is not None:
            results["summary"] = summary

    return app


app = build_server_app()
