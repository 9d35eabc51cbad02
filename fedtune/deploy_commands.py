"""The deployment commands an institution and the coordinator run: TLS certificates, an
institution's own keys, and its SuperNode, checked (`check-node`) and run beside its own runtime
(`run-node`). The operator's key and signed jobs are in job_commands.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from fedtune.common.errors import FedtuneError
from fedtune.shell import INPUT_ERROR, console, error_line


def certs(
    out: Path = typer.Option(..., "--out", help="Directory for the CA and the SuperLink certificate and key."),
    hosts: str = typer.Option(..., "--hosts", help="Comma-separated names/IPs SuperNodes use to reach the "
                              "SuperLink (e.g. coordinator.example.org,10.0.0.5)."),
    nodes: Optional[int] = typer.Option(None, "--nodes", hidden=True),  # gone: only to say what replaced it
    days: int = typer.Option(365, "--days", help="Certificate validity in days."),
) -> None:
    """TLS certificates for a deployment (the CA and the SuperLink's); institutions run `fedtune node-keys`."""
    if nodes is not None:
        raise FedtuneError("--nodes is gone: the coordinator no longer makes SuperNode keys. Each institution "
                           "runs `fedtune node-keys --out DIR` on its own machine and sends you only its "
                           "supernode.pub, which you register with `flwr supernode register`")
    from fedtune.certs import make_credentials

    made = make_credentials(out=out, hosts=[h.strip() for h in hosts.split(",") if h.strip()], days=days)
    shell = console()
    shell.print(f"CA certificate      {made.ca_certificate}   (give to every institution)")
    shell.print(f"SuperLink TLS       {made.superlink_certificate}, {made.superlink_key}")
    shell.print(f"{out / 'ca.key'} signs certificates: keep it offline.")
    shell.print("SuperNode keys: each institution runs `fedtune node-keys` and sends you only its .pub;\n"
                "register each with `flwr supernode register FILE.pub <federation>`.", highlight=False)


def node_keys(
    out: Path = typer.Option(..., "--out", help="Directory for this institution's SuperNode key pair."),
    ledger_dir: Optional[Path] = typer.Option(None, "--ledger-dir", help="Also make the ledger's signing key "
                                              "pair here (the node config's ledger-dir)."),
    name: str = typer.Option("supernode", "--name", help="This institution's name, the public key's comment."),
) -> None:
    """Run by each institution on its own machine: its SuperNode (and ledger) keys, which never leave it."""
    from fedtune.node_keys import make_node_keys

    made = make_node_keys(out=out, ledger_dir=ledger_dir, name=name)
    shell = console()
    shell.print(f"send to the coordinator  {made.supernode_public_key}   "
                f"(it runs `flwr supernode register {made.supernode_public_key.name} <federation>`)", highlight=False)
    if made.ledger_public_key is not None:
        shell.print(f"give to the auditor      {made.ledger_public_key}   "
                    f"(pinned as --public-key CLIENT-ID={made.ledger_public_key.name})", highlight=False)
    else:
        shell.print("give to the auditor      ledger.pub from the node config's ledger-dir, made there on the first "
                    "round\n                         (or now: --ledger-dir)", highlight=False)
    kept = ", ".join(str(path) for path in (made.supernode_key, made.ledger_key) if path is not None)
    shell.print(f"never leaves this site   {kept}   (private, 0600)", highlight=False)


def check_node_command(
    superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink, as flower-supernode takes it."),
    root_certificates: Path = typer.Option(..., "--root-certificates", help="The federation's ca.crt."),
    private_key: Path = typer.Option(..., "--auth-supernode-private-key", help="This node's supernode-N key."),
    node_config: str = typer.Option(..., "--node-config", help="The node config flower-supernode will get."),
) -> None:
    """Check a SuperNode's setup before starting it: node config and data, keys, TLS to the SuperLink."""
    from fedtune.node_check import check_node

    result = check_node(superlink=superlink, root_certificates=root_certificates, private_key=private_key,
                        node_config=node_config)
    for line in result.passed:
        console().print(f"[green]ok[/green]    {escape(line)}", highlight=False)
    for line in result.problems:
        error_line(line)
    if result.problems:
        raise typer.Exit(INPUT_ERROR)


def run_node(
    ctx: typer.Context,
    superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink."),
    root_certificates: Path = typer.Option(..., "--root-certificates", help="The federation's ca.crt."),
    private_key: Path = typer.Option(..., "--auth-supernode-private-key", help="This node's supernode-N key."),
    node_config: str = typer.Option(..., "--node-config", help="This institution's node config."),
    timings: Optional[Path] = typer.Option(None, "--timings", hidden=True, help="One JSON line per message."),
) -> None:
    """check-node, then flower-supernode (process isolation) beside this node's own runtime: only
    the fedtune installed here executes, for jobs the pinned operator signed. Extra arguments go
    to flower-supernode; Flower errors that need someone else to act get a hint. The log names each
    run once, as `fedtune run ID (Flower run N)`: ID is the one `fedtune receipt --run-id` takes."""
    from flwr.common.config import parse_config_args

    from fedtune.job_commands import node_gate
    from fedtune.node_check import check_node
    from fedtune.supernode_runner import run_supernode_with_runtime

    result = check_node(superlink=superlink, root_certificates=root_certificates, private_key=private_key,
                        node_config=node_config)
    if result.problems:
        raise FedtuneError("; ".join(result.problems))
    parsed = parse_config_args([node_config])
    code, hints = run_supernode_with_runtime(
        ["--superlink", superlink, "--root-certificates", str(root_certificates),
         "--auth-supernode-private-key", str(private_key), "--node-config", node_config],
        extra=list(ctx.args), gate=node_gate(parsed), node_config=parsed, timings=timings)
    for hint in hints:
        error_line(hint)
    raise typer.Exit(code)
