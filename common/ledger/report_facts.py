"""What the privacy report states about a run, gathered from its signed ledgers first.

A privacy officer signs a statement per institution: epsilon and delta, for which unit of
privacy, under which mechanism (clipping bound C, noise multiplier sigma, sampling rate q,
steps), which accountant the client used to sign it and which one the audit re-checked it with.
The per-client figures come from each client's own signed records; run.json, config.toml and
summary.json (unsigned, the operator's) only add the run's id, its task and the test split.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fedtune.common.ledger.audit import AuditResult
from fedtune.common.ledger.chain import read_records
from fedtune.common.ledger.run_checks import run_id_of
from fedtune.common.protocol import Status

ACCOUNTANTS = {"prv": "Opacus PRV accountant", "rdp": "Opacus RDP accountant", "gdp": "Opacus GDP accountant"}
RECHECK = ("Google dp_accounting PLD accountant (add-or-remove-one neighbours, pessimistic discretization "
           "1e-3, confirmed at 1e-4 before anything is flagged), from the history each client signed")


@dataclass
class ClientGuarantee:
    client_id: str
    train_records: int | None
    rounds_trained: int
    steps: int
    epsilon: float | None  # the last epsilon the client signed
    recomputed: float | None  # the audit's recomputation of it
    target_epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    clipping_bound: float | None
    accountant: str

    @property
    def unit(self) -> str:
        return "one training record"  # of this client: its guarantee is per institution


@dataclass
class RunFacts:
    run_id: str
    run_dates: str
    report_date: str
    fedtune_version: str
    task: str
    data: str | None  # the config's data source: "default" or the path the operator gave
    test_examples: int | None
    rounds: int
    clients: list[ClientGuarantee] = field(default_factory=list)
    initial_scores: dict[str, float] = field(default_factory=dict)  # round 0: the base adapter's score


def gather_facts(*, result: AuditResult, run_dir: Path | None) -> RunFacts:
    run_id = run_id_of(run_dir) if run_dir else None
    records = {c.owner: [r for r in read_records(Path(c.path)) if run_id is None or r.get("run_id") == run_id]
               for c in result.ledgers if c.owner != "server"}
    config = _read_toml(run_dir / "config.toml") if run_dir else {}
    summary = _read_json(run_dir / "summary.json") if run_dir else {}
    times = [r["time"] for rs in records.values() for r in rs if isinstance(r.get("time"), (int, float))]
    return RunFacts(
        run_id=run_id or "not recorded (no run.json)",
        run_dates=_span(times),
        report_date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        fedtune_version=_version(),
        task=str(summary.get("task") or config.get("task") or "not recorded"),
        data=str(config["data"]) if "data" in config else None,
        test_examples=_int(summary.get("test_examples")),
        rounds=max((r.round for r in result.rows), default=0),
        clients=[_guarantee(owner, rs, config, result) for owner, rs in records.items()],
        initial_scores={key.removeprefix("initial_test_").removeprefix("base_"): value
                        for key, value in summary.items()
                        if key.startswith(("initial_test_", "base_")) and isinstance(value, (int, float))})


def _guarantee(owner: str, records: list[dict[str, Any]], config: dict, result: AuditResult) -> ClientGuarantee:
    trained = [r for r in records if r.get("status") == Status.TRAINED]
    dp = [r for r in records if r.get("dp") is True]
    last = dp[-1] if dp else (records[-1] if records else {})
    policy = last.get("policy") if isinstance(last.get("policy"), dict) else {}
    caps = [v for v in (config.get("max-grad-norm"), policy.get("max-grad-norm")) if _is_number(v)]
    rows = [r for r in result.rows if r.client_id == str(last.get("client_id", owner)) and r.claimed_epsilon is not None]
    return ClientGuarantee(
        client_id=str(last.get("client_id", owner)), train_records=_int(last.get("local_examples")),
        rounds_trained=len(trained), steps=sum(r["steps"] for r in trained if isinstance(r.get("steps"), int)),
        epsilon=rows[-1].claimed_epsilon if rows else None, recomputed=rows[-1].recomputed_epsilon if rows else None,
        target_epsilon=_float(last.get("target_epsilon")), delta=_float(last.get("delta")),
        noise_multiplier=_float(last.get("noise_multiplier")), sample_rate=_float(last.get("sample_rate")),
        clipping_bound=min(caps) if caps else None,  # the job's C, never above the node policy's cap
        accountant=ACCOUNTANTS.get(str(last.get("accountant")), str(last.get("accountant", "none (no DP)"))))


def _span(times: list[float]) -> str:
    if not times:
        return "not recorded"
    first, last = (datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M") for t in (min(times), max(times)))
    return f"{first} to {last} UTC (the clients' signed records)"


def _version() -> str:
    try:
        return metadata.version("fedtune")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
