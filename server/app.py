"""The fedtune ServerApp.

`app` is what `flwr run` loads (config from the Flower run config, outputs under runs/);
`build_server_app` binds a resolved config, run directory and progress callback, as
`fedtune simulate` uses it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.federation import run_federation
from server.recorder import RoundCallback
from server.run_directory import RunDirectory, default_run_dir


def build_server_app(*, config: RunConfig | None = None, run_dir: Path | None = None,
                     on_round: RoundCallback | None = None, results: dict | None = None,
                     resume: bool = False) -> ServerApp:
    """`results`, when given, receives the run summary under the key 'summary'; with `resume`,
    `run_dir` is an interrupted run to continue from its checkpoint."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else RunConfig.from_mapping(context.run_config)
        if resume:
            directory = RunDirectory.open_existing(run_dir)
        else:
            directory = RunDirectory.create(path=run_dir or Path(cfg.output_dir or default_run_dir()), config=cfg)
        summary = run_federation(grid=grid, context=context, config=cfg, run_dir=directory, on_round=on_round,
                                 resume=resume)
        if results is not None:
            results["summary"] = summary

    return app


app = build_server_app()
