"""Cross-checks inside a run directory: the operator's files against what was signed.

The ledgers are signed; run.json, config.toml, adapter/, metrics.jsonl and summary.json are not.
Each of these is compared with the server ledger (and the server ledger with the clients'):
- every ledger names the run that run.json names;
- the rounds the server signed are 1..n, as many as config.toml asks once the run finished;
- the adapter/ files are byte for byte the ones the server signed after the last round, and
  that record's adapter fingerprint is the last round's;
- whom the server records as trained, the client's own ledger records as trained;
- metrics.jsonl and summary.json list the rounds the server signed.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from fedtune.common.counts import counted
from fedtune.common.ledger.records import ADAPTER_SAVED, is_round_record
from fedtune.common.ledger.stop_checks import early_stop_problems
from fedtune.common.protocol import Status
from fedtune.common.storage import file_digests


def run_id_of(run_dir: Path) -> str | None:
    try:
        value = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def configured_rounds(run_dir: Path) -> int | None:
    try:
        value = tomllib.loads((Path(run_dir) / "config.toml").read_text(encoding="utf-8")).get("num-rounds")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_findings(run_dir: Path, server: list[dict], clients: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """(problems, notes) of the cross-checks above."""
    problems: list[str] = []
    notes: list[str] = []
    run_id = run_id_of(run_dir)
    if run_id is None:
        problems.append(f"{Path(run_dir) / 'run.json'} is missing or unreadable: the ledgers cannot be tied to a run")
    else:
        _run_ids(run_id, server, clients, problems, notes)
    rounds = [r for r in server if is_round_record(r)]
    saved = [r for r in server if r.get("event") == ADAPTER_SAVED]
    _rounds(run_dir, rounds, finished=bool(saved) or (Path(run_dir) / "summary.json").is_file(),
            problems=problems, notes=notes)
    _adapter(run_dir, rounds, saved, problems)
    _who_trained(rounds, clients, problems)
    problems += early_stop_problems(rounds, clients, run_id)
    _outputs(run_dir, rounds, problems)
    return problems, notes


def _run_ids(run_id: str, server: list[dict], clients: dict[str, list[dict]], problems: list[str],
             notes: list[str]) -> None:
    foreign = sorted({str(r.get("run_id")) for r in server} - {run_id})
    if foreign:
        problems.append(f"the server ledger records run(s) {', '.join(foreign)}; run.json names {run_id}")
    for owner, records in clients.items():
        other = sum(1 for r in records if r.get("run_id") != run_id)
        if other == len(records):
            problems.append(f"{owner}'s ledger has no record of run {run_id} (run.json)")
        elif other:
            notes.append(f"{owner}'s ledger also holds {other} record(s) of other runs (a ledger kept across runs)")


def _rounds(run_dir: Path, rounds: list[dict], *, finished: bool, problems: list[str], notes: list[str]) -> None:
    numbers = [r.get("round") for r in rounds]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"the server ledger's rounds are {numbers}, not 1 to {len(numbers)} in order")
    asked = configured_rounds(run_dir)
    if asked is None:
        notes.append("config.toml is missing or names no num-rounds: the number of rounds was not checked")
    elif len(rounds) > asked:
        problems.append(f"the server ledger records {counted(len(rounds), 'round')}, config.toml asks {asked}")
    elif len(rounds) < asked and _every_client_refused(rounds[-1] if rounds else {}):
        notes.append(f"the run stopped after round {len(rounds)} of {asked}: every sampled client refused it "
                     f"(the server's signed record of that round)")
    elif len(rounds) < asked and "stopped_early" in (rounds[-1] if rounds else {}):  # checked in stop_checks
        notes.append(f"the run stopped early after round {len(rounds)} of {asked}: "
                     f"{rounds[-1]['stopped_early']} (the server's signed record of that round)")
    elif len(rounds) < asked and finished:
        problems.append(f"the run finished (summary.json or a saved adapter) but the server ledger records "
                        f"{len(rounds)} of the {counted(asked, 'round')} config.toml asks: round(s) "
                        f"{', '.join(map(str, range(len(rounds) + 1, asked + 1)))} missing")
    elif len(rounds) < asked:
        notes.append(f"the run stopped after round {len(rounds)} of {asked}: interrupted, or its last rounds were "
                     f"removed with every trace of them (receipts from the institutions tell which)")


def _every_client_refused(entry: dict) -> bool:
    """The server stops a run early when every client it sampled refused (server/bookkeeping.py)."""
    replied, refused = entry.get("replied") or [], entry.get("refused") or []
    return bool(replied) and sorted(refused) == sorted(replied) and len(replied) == entry.get("sampled")


def _adapter(run_dir: Path, rounds: list[dict], saved: list[dict], problems: list[str]) -> None:
    adapter_dir = Path(run_dir) / "adapter"
    if not saved:
        if adapter_dir.is_dir():
            problems.append("adapter/ exists but the server ledger records no saved adapter (its last record was "
                            "removed, or the run predates this record)")
        return
    last = saved[-1]
    if not rounds or last.get("adapter_sha256") != rounds[-1].get("adapter_sha256") \
            or last.get("round") != len(rounds):
        problems.append(f"the saved adapter the server signed is not the one of its last round ({len(rounds)})")
    files = last.get("files") if isinstance(last.get("files"), dict) else {}
    on_disk = file_digests(adapter_dir) if adapter_dir.is_dir() else {}
    for name in sorted(set(files) | set(on_disk)):
        if name not in on_disk:
            problems.append(f"adapter/{name}: signed by the server after round {last.get('round')}, missing")
        elif name not in files:
            problems.append(f"adapter/{name}: not among the files the server signed after round {last.get('round')}")
        elif on_disk[name] != files[name]:
            problems.append(f"adapter/{name}: differs from the file the server signed after round "
                            f"{last.get('round')} (replaced)")


def _who_trained(rounds: list[dict], clients: dict[str, list[dict]], problems: list[str]) -> None:
    status = {(str(r.get("client_id", owner)), str(r.get("run_id")), r.get("round")): r.get("status")
              for owner, records in clients.items() for r in records if r.get("request", "fit") == "fit"}
    for entry in rounds:
        for cid in entry.get("trained") or []:
            own = status.get((cid, str(entry.get("run_id")), entry.get("round")))
            if own is not None and own != Status.TRAINED:
                problems.append(f"server round {entry.get('round')}: records {cid} as trained, {cid} signed {own}")
        for cid in entry.get("refused") or []:  # e.g. a forged "everyone refused" round that ends the run
            own = status.get((cid, str(entry.get("run_id")), entry.get("round")))
            if own == Status.TRAINED:
                problems.append(f"server round {entry.get('round')}: records {cid} as refusing, {cid} signed trained")


def _outputs(run_dir: Path, server: list[dict], problems: list[str]) -> None:
    """The server's signed rounds must agree with the run's metrics.jsonl and summary.json."""
    metrics_path, summary_path = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "summary.json"
    if metrics_path.is_file():
        try:
            rounds = [json.loads(line)["round"] for line in metrics_path.read_text().splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError, RecursionError):
            problems.append(f"{metrics_path} is not one JSON object with a 'round' per line")
            rounds = None
        if rounds is not None and rounds != [entry.get("round") for entry in server]:
            problems.append(f"metrics.jsonl lists rounds {rounds}, the server ledger "
                            f"{[entry.get('round') for entry in server]}")
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            completed = summary.get("rounds_completed") if isinstance(summary, dict) else None
        except (ValueError, RecursionError):
            completed = None
        if completed is not None and completed != len(server):
            problems.append(f"summary.json says {counted(completed, 'round')} completed, the server ledger "
                            f"has {len(server)}")
