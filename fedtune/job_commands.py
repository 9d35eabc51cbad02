"""The operator's side of signed jobs, and the coordinator's pinned runtime.

`operator-key` makes the key institutions pin; `app-hash` prints the pinned app's hash (what
every party's installation builds); `sign-job` turns a `--run-config` into a signed job for
`flwr run`; `run-superlink` starts the SuperLink with a runtime that runs only the pinned
ServerApp for signed jobs (fedtune/coordinator_runtime.py).
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedtune.common.errors import FedtuneError
from fedtune.shell import console, err


def operator_key(out: Path = typer.Option(..., "--out", help="Directory for the operator's Ed25519 key pair.")) -> None:
    """The coordinator operator's signing key: operator.pub goes to every institution to pin."""
    from fedtune.common.trust.job_signature import make_operator_keys

    public = make_operator_keys(out)
    console().print(f"give to every institution  {public}   (node config: operator-key='/path/to/operator.pub')",
                    highlight=False)
    console().print(f"never leaves the operator  {out / 'operator.key'}   (private, 0600)", highlight=False)


def app_hash() -> None:
    """The sha256 of the app this installation runs (what `flwr run` of this checkout submits)."""
    from fedtune.common.trust.app_pin import installed_app

    print(installed_app().sha256)


def sign_job(
    key: Path = typer.Option(..., "--key", help="The operator's operator.key."),
    roster: Path = typer.Option(..., "--roster", help="The federation's roster (the one its institutions pinned): "
                                "its fingerprint is signed into the job, and no other federation runs it."),
    run_config: str = typer.Option("", "--run-config", help="The job's overrides, as `flwr run --run-config` takes them."),
    valid_days: int = typer.Option(7, "--valid-days", help="Days the job may start in (1 to 366)."),
) -> None:
    """Print the signed --run-config for `flwr run . <federation> --run-config "$(fedtune sign-job ...)"`.
    The job is checked first as every party will check it (config values, the default node caps)."""
    from fedtune.common.secure_aggregation.roster import Roster
    from fedtune.common.trust.signing import signed_run_config

    federation = Roster.load(roster).fingerprint
    text, job_id = signed_run_config(key=key, run_config=run_config, valid_days=valid_days, federation=federation,
                                     check=check_job)
    err.print(f"signed job {job_id} for the app installed here and the federation {federation}; valid "
              f"{valid_days} day(s)", highlight=False, soft_wrap=True)
    print(text)


def check_job(fused) -> None:
    """What every party will refuse in a fused run config, refused before it is signed: its values
    (RunConfig, as nodes and the coordinator parse it) and the default node caps on rounds and on the
    DP steps no record count could lower (a node's own caps may be tighter)."""
    from fedtune.common.config import RunConfig
    from fedtune.common.privacy.plan import size_problem

    problem = size_problem(RunConfig.from_mapping(dict(fused)), num_examples=None,
                           party="a node with the default policy")
    if problem:
        raise FedtuneError(f"{problem}; the job was not signed")


def node_gate(node: dict):
    """A node's run gate: its pinned app, operator key and the fingerprint of the roster it pins
    (a roster it cannot read is a setup error, named in one line)."""
    from fedtune.common.secure_aggregation.roster import Roster
    from fedtune.common.trust.gate import RunGate

    federation = Roster.load(str(node["roster"])).fingerprint if node.get("roster") else None
    return RunGate.from_node_config(node, federation=federation)


def run_superlink(
    ctx: typer.Context,
    operator_public_key: Path = typer.Option(..., "--operator-key", help="The operator's operator.pub."),
    state_dir: Path = typer.Option(..., "--state-dir", help="Where the coordinator records which run each "
                                   "signed job became (jobs.json): keep it across restarts, like --database."),
) -> None:
    """flower-superlink in process isolation (extra arguments go to it) with a runtime that runs
    only the pinned ServerApp, for jobs the operator key signed, once each."""
    from fedtune.coordinator_runtime import run_superlink_with_runtime

    raise typer.Exit(run_superlink_with_runtime(list(ctx.args), operator_key=operator_public_key,
                                                state_dir=state_dir))
