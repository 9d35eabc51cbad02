"""The `fedtune` command line. User mistakes print one line and exit non-zero.

This package sits above everything it drives (simulations, server, client, common). Each
command imports what it drives when it runs, so `fedtune --help` and `fedtune audit` (without
`--report`, which asks each task for its headline score) never load torch, transformers or Flower.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from fedtune.common.errors import FedtuneError

from fedtune import audit_commands, deploy_commands, job_commands, predict_command
from fedtune.shell import BUDGET_EXCEEDED, EXIT_CODES_HELP, console, err

HELP = "Privacy-preserving federated LoRA fine-tuning (Flower + Opacus + SecAgg+)."
# Tracebacks never reach the terminal (main() logs them without local variables); click's own
# "Did you mean" suggestion is the only one; -h is --help everywhere.
cli = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, suggest_commands=False,
                  pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _print_version(value: bool) -> None:
    if value:
        from fedtune.shell import versions_line

        print(versions_line())
        raise typer.Exit()


@cli.callback(epilog=EXIT_CODES_HELP)
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print fedtune's version and those of flwr, opacus and torch.")) -> None:
    """Privacy-preserving federated LoRA fine-tuning (Flower + Opacus + SecAgg+)."""


PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}  # extra args go to Flower
RUN_SUPERLINK_EPILOG = ("Flower 1.41 serves its unauthenticated Control API (flwr ls/run/stop, supernode "
                        "list/register/unregister) on the Fleet port: a --host beyond loopback is refused unless "
                        "--control-behind-authenticating-proxy states that a proxy in front of the port forwards "
                        "/v1/fleet/ to anyone and /v1/control/ only to authenticated operators.")
RUN_NODE_EPILOG = ("If its node is unregistered once it served, run-node keeps running: it logs what to do (Flower "
                   "never registers an unregistered key again: a new key pair at the same path, registered by the "
                   "coordinator) and retries (5 s, doubling to 60 s) until the node serves again.")
SetOption = typer.Option([], "--set", help="Override a config key: --set key=value (repeatable).")


@cli.command()
def simulate(
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of config keys."),
    overrides: list[str] = SetOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<timestamp>); "
                                       "refused if it is a non-empty folder that is not a fedtune run."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final summary (and errors)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the summary JSON on stdout; the rest "
                                 "goes to stderr (`fedtune simulate --json | jq`)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory "
                                          "from its last checkpoint (its own config is used)."),
    engine: str = typer.Option("ray", "--engine", help="ray (Flower's simulation engine) or in-process (the "
                               "same apps without Ray: nodes one after another in this process, for debugging)."),
) -> None:
    """Run a whole federation on this machine with Flower's simulation engine."""
    from fedtune.common.config import RunConfig
    from fedtune import shell
    from fedtune.simulations.resume import resume_config

    if resume is not None:
        if config is not None or out is not None:
            raise FedtuneError("--resume takes the run directory's own config and outputs; drop --config/--out")
        resolved, out = resume_config(resume, overrides), resume
    else:
        resolved = RunConfig.load(path=config, overrides=overrides)
    from fedtune.simulations.simulate import simulate as run  # Flower, Ray and torch load once the config is valid

    # --json: stdout holds the summary alone; --quiet: nothing but the summary and errors.
    shell_console = console(stderr=as_json, quiet=quiet)
    summary = run(config=resolved, out=out, verbose=verbose, console=shell_console, resume=resume is not None,
                  progress=not (quiet or as_json), on_run_dir=shell.log_dir_hint.append, engine=engine)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console().print_json(json.dumps(summary))


cli.command()(audit_commands.audit)
cli.command()(audit_commands.receipt)
cli.command()(predict_command.predict)


@cli.command()
def plan(
    target_epsilon: float = typer.Option(8.0, "--target-epsilon", help="Budget epsilon for the whole run."),
    delta: float = typer.Option(1e-5, "--delta", help="Budget delta; must be below 1/dataset-size."),
    dataset_size: int = typer.Option(..., "--dataset-size", help="The client's number of training examples."),
    batch_size: int = typer.Option(64, "--batch-size", help="Expected batch size (the run default)."),
    local_epochs: int = typer.Option(1, "--local-epochs", help="Local epochs per round."),
    rounds: int = typer.Option(3, "--rounds", help="Rounds the client will train."),
    accountant: str = typer.Option("prv", "--accountant", help="prv or rdp."),
    noise_multiplier: float = typer.Option(0.0, "--noise-multiplier", help="Force sigma (0 calibrates)."),
    mode: str = typer.Option("", "--mode", help="adapter, probe (full-batch head steps) or two-stage; unset: "
                             "what a run with this budget trains by default."),
    probe_rounds: int = typer.Option(1, "--probe-rounds", help="two-stage: probe rounds before the adapter's."),
    probe_steps: int = typer.Option(16, "--probe-steps", help="probe/two-stage: full-batch steps per probe round."),
    probe_share: float = typer.Option(0.5, "--probe-epsilon-share", help="two-stage: the probe rounds' share "
                                      "of epsilon."),
    allow_large_delta: bool = typer.Option(False, "--allow-large-delta", help="Accept delta >= 1/dataset-size "
                                           "(a client that sets its own target-delta may)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Save a PNG of epsilon per round."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """The noise multiplier and epsilon after each round, computed exactly as a client will; each
    row's budget left is what an early stop after that round leaves unspent. Exits 2 when a round
    would spend more than the budget (the client refuses it)."""
    from fedtune import plan_view

    request = plan_view.PlanRequest(target_epsilon=target_epsilon, delta=delta, dataset_size=dataset_size,
                                    batch_size=batch_size, local_epochs=local_epochs, rounds=rounds,
                                    accountant=accountant, noise_multiplier=noise_multiplier,
                                    allow_large_delta=allow_large_delta, mode=mode, probe_rounds=probe_rounds,
                                    probe_steps=probe_steps, probe_share=probe_share)
    request = plan_view.check_request(request, plot)
    plan_view.load_accountants_without_torch()  # this process only plans: never trains
    schedule = plan_view.schedule_of(request)
    if as_json:
        plan_view.print_json(schedule)
    else:
        plan_view.print_schedule(schedule, console())
    if plot is not None:
        plan_view.plot_schedule(schedule, plot)
        err.print(f"wrote {plot}", highlight=False)
    warning = plan_view.over_budget_warning(schedule)
    if warning:
        err.print(f"[bold yellow]over budget:[/bold yellow] {warning}", highlight=False, soft_wrap=True)
        raise typer.Exit(BUDGET_EXCEEDED)


for name, command in (("certs", deploy_commands.certs), ("node-keys", deploy_commands.node_keys),
                      ("check-node", deploy_commands.check_node_command), ("operator-key", job_commands.operator_key),
                      ("app-hash", job_commands.app_hash), ("sign-job", job_commands.sign_job)):
    cli.command(name)(command)
cli.command("run-node", context_settings=PASS_THROUGH, epilog=RUN_NODE_EPILOG)(deploy_commands.run_node)
cli.command("run-superlink", context_settings=PASS_THROUGH, epilog=RUN_SUPERLINK_EPILOG)(job_commands.run_superlink)


roster_cli = typer.Typer(no_args_is_help=True, help="The federation's roster of institution identity keys.")
cli.add_typer(roster_cli, name="roster")


@roster_cli.command("build")
def roster_build(
    members: list[str] = typer.Option(..., "--member", help="ID=PATH: an institution's client-id and its ledger.pub "
                                      "(or ledger-dir); repeat for every institution."),
    out: Path = typer.Option(..., "--out", help="The roster file to write (JSON)."),
    federation: str = typer.Option("", "--federation", help="The federation's name, for people reading the file."),
    expires: Optional[str] = typer.Option(None, "--expires", help="YYYY-MM-DD after which nodes refuse it "
                                          "(default: 180 days)."),
) -> None:
    """Build the roster every institution pins: who may take part in secure aggregation, with which key."""
    from fedtune.roster import build_roster

    roster = build_roster(members=members, out=out, federation=federation, expires=expires)
    _print_roster(roster, out)
    console().print("send this file to every institution; each checks it (`fedtune roster check`) and compares "
                    "the fingerprint with the others out of band", highlight=False)


@roster_cli.command("check")
def roster_check(
    path: Path = typer.Argument(..., help="The roster file."),
    institution: Optional[str] = typer.Option(None, "--institution", help="This node's client-id."),
    key: Optional[Path] = typer.Option(None, "--key", help="This node's ledger.pub (or its ledger-dir)."),
) -> None:
    """Check a roster: well-formed, not expired, and (with --institution/--key) listing this node."""
    from fedtune.roster import check_roster

    _print_roster(check_roster(path=path, institution=institution, key=key), path)


def _print_roster(roster, path: Path) -> None:
    shell = console()
    shell.print(f"roster       {path}: {len(roster.members)} institutions ({', '.join(sorted(roster.members))}), "
                f"federation {roster.federation or '-'}, expires {roster.expires.isoformat()}", highlight=False)
    shell.print(f"fingerprint  {roster.fingerprint}", highlight=False)


def main() -> None:
    if "--verbose" not in sys.argv:
        # Library deprecation chatter is not for users; --verbose shows everything.
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # Ray actors inherit it
    sys.exit(run_cli())


def run_cli(args: list[str] | None = None) -> int:
    """The exit code of one command (see shell.py): usage errors get their own, and an
    unexpected error is one line here and a traceback without local variables in a log file."""
    import click

    from fedtune import shell

    try:
        code = cli(args=args, standalone_mode=False)  # returns the code of typer.Exit in this mode
        return code if isinstance(code, int) else shell.CLEAN
    except FedtuneError as exc:
        shell.error_line(str(exc))
        return shell.INPUT_ERROR
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        err.print("interrupted", highlight=False)
        return shell.INTERRUPTED
    except click.UsageError as exc:
        _config_key_hint(exc).show()
        return shell.USAGE_ERROR
    except click.ClickException as exc:  # e.g. a file option click itself could not open: bad input
        exc.show()
        return shell.INPUT_ERROR
    except Exception as exc:
        return shell.report_unexpected(exc)


def _config_key_hint(exc):
    """An unknown option nearer a config key than any option of a command that takes --set
    (`simulate --rounds 3`) suggests `--set num-rounds=VALUE`, not click's nearest option (--out)."""
    import difflib
    from dataclasses import fields

    import click

    command = exc.ctx.command if exc.ctx is not None else None
    if not isinstance(exc, click.NoSuchOption) or command is None or not any(
            "--set" in param.opts for param in command.params):
        return exc
    from fedtune.common.config import RunConfig

    name = exc.option_name.lstrip("-")

    def score(other: str) -> float:
        return difflib.SequenceMatcher(None, name, other).ratio()

    keys = difflib.get_close_matches(name, [field.name.replace("_", "-") for field in fields(RunConfig)], n=1)
    options = [option.lstrip("-") for param in command.params for option in param.opts]
    if not keys or score(keys[0]) < max(map(score, options), default=0.0):
        return exc
    return click.UsageError(f"No such option '{exc.option_name}'. Config keys go through --set: did you mean "
                            f"'--set {keys[0]}=VALUE'?", ctx=exc.ctx)


if __name__ == "__main__":
    main()
