"""The `fedtune` command line. User mistakes print one line and exit non-zero."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from common.errors import FedtuneError

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Privacy-preserving federated LoRA fine-tuning (Flower + Opacus + SecAgg+).")
err = Console(stderr=True)



@cli.callback()
def _root() -> None:
    """Privacy-preserving federated LoRA fine-tuning (Flower + Opacus + SecAgg+)."""


SetOption = typer.Option([], "--set", help="Override a config key: --set key=value (repeatable).")


@cli.command()
def simulate(
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of config keys."),
    overrides: list[str] = SetOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<timestamp>)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a whole federation on this machine with Flower's simulation engine."""
    from common.config import RunConfig
    from simulations.simulate import simulate as run

    resolved = RunConfig.load(path=config, overrides=overrides)
    summary = run(config=resolved, out=out, verbose=verbose)
    Console().print_json(json.dumps(summary))


def main() -> None:
    if "--verbose" not in sys.argv:
        # Library deprecation chatter is not for users; --verbose shows everything.
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # Ray actors inherit it
    try:
        cli(standalone_mode=False)
    except FedtuneError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit codes
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
