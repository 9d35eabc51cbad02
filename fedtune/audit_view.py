"""The terminal view of an audit: one row per client per round, then the verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fedtune.common.ledger.audit import AuditResult

VERDICT_STYLE = {0: "bold green", 1: "bold red", 2: "bold yellow"}
UNPINNED_STYLE = "bold cyan"  # consistent, but not attested by the institutions' keys: not the green of "clean"


def _num(value, pattern: str = ".4f") -> str:
    return "-" if value is None else format(value, pattern)


def print_audit(result: AuditResult, console: Console) -> None:
    table = Table(title="Privacy spend per client per round")
    for column in ("client", "round", "status", "steps", "sigma", "q", "claimed ε", "recomputed ε",
                   "budget", "δ", "check"):
        table.add_column(column, justify="left" if column in ("client", "status", "check") else "right")
    for row in result.rows:
        check = "[green]ok[/green]" if not row.flags else "[red]" + ", ".join(row.flags) + "[/red]"
        table.add_row(row.client_id, str(row.round), row.status, str(row.steps), _num(row.noise_multiplier),
                      _num(row.sample_rate), _num(row.claimed_epsilon), _num(row.recomputed_epsilon),
                      _num(row.target_epsilon, "g"), _num(row.delta, "g"), check)
    console.print(table)
    for ledger in result.ledgers:
        state = "[green]chain and signatures verify[/green]" if not ledger.problems else \
            f"[red]{len(ledger.problems)} problem(s)[/red]"
        console.print(f"  {ledger.owner}: {ledger.records} records, {result.key_use(ledger)} {ledger.key_fingerprint}: "
                      f"{state}")
    for line in result.trust:
        console.print(f"  [bold]rests on:[/bold] {line}", soft_wrap=True)
    for note in result.notes:
        console.print(f"  [dim]note: {note}[/dim]")
    for problem in result.problems:
        console.print(f"  [red]FAIL[/red] {problem}", soft_wrap=True)
    for breach in result.budget_exceeded:
        console.print(f"  [yellow]OVER BUDGET[/yellow] {breach}", soft_wrap=True)
    for breach in result.policy_breaches:
        console.print(f"  [yellow]POLICY[/yellow] {breach}", soft_wrap=True)
    style = VERDICT_STYLE[result.exit_code] if result.exit_code or result.attested else UNPINNED_STYLE
    console.print(f"Verdict: [{style}]{result.verdict_text}[/] (exit {result.exit_code})", soft_wrap=True)
