"""`fedtune audit` (the auditor) and `fedtune receipt` (the institution): the commands around ledgers.

Neither loads torch, transformers or Flower unless asked for a report or a mechanism check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fedtune.common.errors import FedtuneError
from fedtune.shell import console, err


def receipt(
    ledger_dir: Path = typer.Argument(..., help="This institution's ledger directory (its node config's ledger-dir, "
                                      "or ledgers/<client> of a simulated run)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="fedtune's run id (run.json of the run "
                                         "directory; the node's log line 'fedtune run ID (Flower run N)'), not "
                                         "Flower's. Optional when the ledger holds one run."),
    out: Path = typer.Option(..., "--out", help="The receipt file to write and hand to the auditor."),
) -> None:
    """Sign a receipt of this institution's ledger for a run, for an auditor to check the run against."""
    from rich.markup import escape

    from fedtune.common.ledger.receipts import printable, write_receipt

    payload = write_receipt(ledger_dir=ledger_dir, run_id=run_id, out=out)
    body = payload["receipt"]
    epsilon = "-" if body["epsilon"] is None else f"{body['epsilon']:.4f}"
    said = (f"receipt  {out}: {printable(body['client_id'])}, run {printable(body['run_id'])}, {body['records']} "
            f"records, last round {body['last_round']}, cumulative epsilon {epsilon}, key "
            f"{payload['key_fingerprint']}")
    console().print(escape(said), highlight=False, soft_wrap=True)  # the run id is the coordinator's text
    console().print("give it to the auditor directly, not through the coordinator", highlight=False)


def audit(
    target: Path = typer.Argument(..., help="A run directory, a ledger directory or a ledger.jsonl file."),
    public_keys: list[str] = typer.Option([], "--public-key", help="Pin a key: NAME=FILE (e.g. client-0=keys/c0.pub)."),
    receipts: list[Path] = typer.Option([], "--receipt", help="A receipt an institution signed "
                                        "(`fedtune receipt`); repeat for each."),
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON."),
    report: bool = typer.Option(False, "--report", help="Write the privacy report (report.md, and report.html with "
                                "its plots embedded) beside the run, or into --out."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --report: the folder to write it into (new, empty "
                                       "or a previous report's), e.g. when the run directory is read-only."),
    mechanism: list[str] = typer.Option([], "--mechanism", help="CLIENT: also run that client's DP-SGD step on "
                                        "canaries with its recorded sigma, q and C, and bound epsilon from below "
                                        "(about a minute; repeatable)."),
) -> None:
    """Verify ledgers and recompute every client's epsilon. Exit 0 clean, 1 failed, 2 over budget."""
    from fedtune.audit_view import print_audit
    from fedtune.common.ledger.audit import audit_run
    from fedtune.common.ledger.report import check_out_dir

    if out is not None and not report:
        raise FedtuneError("--out names where the report goes: add --report")
    if out is not None:
        check_out_dir(out)  # before the audit's work, not after

    pinned = {}
    for item in public_keys:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FedtuneError(f"--public-key expects NAME=FILE, got {item!r}")
        pinned[name] = Path(path)
    with err.status("auditing the ledgers...") as status:  # a spinner on a terminal, silent when piped
        result = audit_run(target=target, pinned_keys=pinned, receipts=list(receipts),
                           progress=lambda text: status.update(text + "..."))
    checks = [_check_mechanism(target, client, quiet=as_json) for client in mechanism]
    for client, check in zip(mechanism, checks):
        if check.finding:
            result.problems.append(f"{client}: the mechanism check measured epsilon >= {check.tightest_lower:.3f} "
                                   f"where its accountant claims {check.tightest_claim:.3f} (delta "
                                   f"{check.tightest_delta:.0e}): the noise, clipping or sampling is not what "
                                   f"its ledger records")
    if as_json:
        from dataclasses import asdict

        from fedtune.common.storage import json_safe

        payload = result.to_json()
        if checks:
            payload["mechanism"] = {c: {**asdict(k), "finding": k.finding} for c, k in zip(mechanism, checks)}
        print(json.dumps(json_safe(payload), indent=2))
    else:
        print_audit(result, console())
    if report:
        _write_report(result, target, out)
    raise typer.Exit(result.exit_code)


def _write_report(result, target: Path, out: Path | None) -> None:
    from fedtune.common.ledger.report import write_report

    run_dir = target if target.is_dir() and (target / "ledgers").is_dir() else None
    out_dir = out or run_dir or (target.parent if target.is_file() else target)
    with err.status("writing the report and its plots..."):
        files = write_report(result=result, run_dir=run_dir, out_dir=out_dir)
    err.print("wrote " + ", ".join(str(f) for f in files), highlight=False, soft_wrap=True)


def _check_mechanism(target: Path, client: str, *, quiet: bool):
    """The white-box canary check of one client's DP-SGD step (client/mechanism_check.py); a
    finding counts only when an independent second check finds it too (about 1 in 40,000 pairs
    on an honest step, while every broken step in BENCHMARKS.md is flagged by each check)."""
    from fedtune.client.mechanism_check import check_run
    from fedtune.mechanism_view import print_mechanism_check

    if not quiet:
        err.print(f"mechanism check of {client}: running its DP-SGD step on canaries (about a minute)...")
    check = check_run(run_dir=target, client_id=client)
    if check.finding:  # a tight 95% bound exceeds an honest claim in about 1 check in 250: confirm it
        if not quiet:
            err.print("finding: repeating the check with fresh randomness to confirm it...")
        check = check_run(run_dir=target, client_id=client)
    if not quiet:
        print_mechanism_check(check, console())
    return check
