"""An audit the operator cannot fool: receipts from the institutions, and cross-checks inside the run.

The session's one finished 3-client, 3-round DP-SGD + SecAgg+ federation (tests/conftest.py,
finished_dp_run: the real round loop and ClientApps in one process); each test forges a copy of its
run directory the way whoever holds it could, then audits it through the CLI (its entry point, in
this process) with and without the institutions' receipts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedtune.common.ledger.chain import Ledger, read_records
from fedtune.common.ledger.receipts import write_receipt
from tests.conftest import FINISHED_CLIENTS as CLIENTS
from tests.helpers import fedtune


@pytest.fixture(scope="module")
def finished(finished_dp_run, tmp_path_factory):
    """The run after round 3, a copy of its directory as it was after round 2, and receipts."""
    root = tmp_path_factory.mktemp("receipts")
    run, snapshot = finished_dp_run.path, finished_dp_run.after_round_2
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    receipts = {}
    for client in CLIENTS:  # what each institution runs on its own ledger, through the CLI
        receipts[client] = root / f"{client}.receipt.json"
        made = fedtune("receipt", str(run / "ledgers" / client), "--run-id", run_id,
                       "--out", str(receipts[client]))
        assert made.returncode == 0, made.stderr
        said = " ".join(made.stdout.split())
        assert f"{client}, run {run_id}" in said and "last round 3" in said
    return run, snapshot, receipts


def _audit(run: Path, *receipts: Path):
    result = fedtune("audit", str(run), "--json", *(f"--receipt={r}" for r in receipts))
    assert result.stdout.strip().startswith("{"), result.stderr[-2000:]
    return result.returncode, json.loads(result.stdout)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "forged"))


def _drop_last(folder: Path, count: int = 1) -> None:
    """Remove a ledger's last records and move its head marker back: a consistent, shorter ledger."""
    _rewrite(folder, read_records(folder / "ledger.jsonl")[:-count])


def _rewrite(folder: Path, records: list[dict]) -> None:
    """Sign `records` as a new chain with the key in `folder` (in a simulation the operator holds
    every key; the server's it holds anyway)."""
    for name in ("ledger.jsonl", "ledger.head"):
        (folder / name).unlink()
    ledger = Ledger(folder)
    for record in records:
        ledger.append({k: v for k, v in record.items() if k not in ("seq", "prev_hash", "signature")})


def _receipted(payload: dict) -> set[str]:
    """Ledgers a receipt agrees with, whether or not it counts as the institution's word."""
    return {check["owner"] for check in payload["ledgers"] if check["receipted"] or check["receipt_unattested"]}


def test_receipts_of_an_honest_simulated_run_agree_but_the_verdict_says_no_institution_attests_it(finished):
    """In a simulation every private key lies in the run directory: receipts agree, and the verdict is
    "consistent", never "clean" (whoever holds the directory could have made them)."""
    run, _, receipts = finished
    code, payload = _audit(run, *receipts.values())
    assert code == 0 and payload["verdict"] == "consistent", payload["problems"]
    assert payload["verdict_text"].startswith("consistent (not independently attested: the private keys of every "
                                              "client ledger are in the run directory")
    assert _receipted(payload) == set(CLIENTS) and not any(c["receipted"] for c in payload["ledgers"])
    trust = " ".join(payload["trust"])
    assert "receipt agrees with the ledger, but verifies only under a key from this directory" in trust
    assert "covered by the institution's own receipt" not in trust
    assert "the private ledger keys of client-0, client-1, client-2, server are inside this directory" in trust
    assert "consistent, not that independent institutions attest it" in trust
    code, payload = _audit(run)  # without receipts: clean, and it says whose word it took
    assert code == 0 and not _receipted(payload)
    assert any("key taken from beside the ledger" in line and "client-0, client-1, client-2, server" in line
               for line in payload["trust"])


def test_truncating_every_ledger_is_caught_by_receipts_naming_client_and_round(finished, tmp_path):
    """The last round dropped everywhere: every ledger, metrics.jsonl, summary.json edited, and
    the adapter and its record removed too, so the run looks interrupted after round 2."""
    run = _copy(finished[0], tmp_path)
    for client in CLIENTS:
        _drop_last(run / "ledgers" / client)
    _drop_last(run / "ledgers" / "server", count=2)  # round 3 and the saved adapter
    metrics = (run / "metrics.jsonl").read_text().splitlines()[:-1]
    (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "adapter")
    code, payload = _audit(run)
    assert code == 0  # nothing inside the directory contradicts it: say so
    assert any("stopped after round 2 of 3" in note and "receipts" in note for note in payload["notes"])
    code, payload = _audit(run, *finished[2].values())
    assert code == 1
    for client in CLIENTS:
        assert any(p.startswith(f"{client} round 3 (trained, record 3): covered by its receipt, missing")
                   for p in payload["problems"]), payload["problems"]


def test_a_missing_last_round_in_a_finished_run_is_caught_without_receipts(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    for client in CLIENTS:
        _drop_last(run / "ledgers" / client)
    _drop_last(run / "ledgers" / "server", count=2)
    metrics = (run / "metrics.jsonl").read_text().splitlines()[:-1]
    (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "rounds_completed": 2}))
    code, payload = _audit(run)
    assert code == 1
    problems = " | ".join(payload["problems"])
    assert "records 2 of the 3 rounds config.toml asks: round(s) 3 missing" in problems
    assert "adapter/ exists but the server ledger records no saved adapter" in problems


def test_hiding_one_client_with_a_resigned_server_ledger_is_caught_by_its_receipt(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    _drop_last(run / "ledgers" / "client-1")
    server = read_records(run / "ledgers" / "server" / "ledger.jsonl")
    hidden = [dict(r) for r in server]
    shown = [c for c in CLIENTS if c != "client-1"]
    hidden[2] = {**hidden[2], "trained": shown, "replied": shown,
                 "epsilon": {c: hidden[2]["epsilon"][c] for c in shown},
                 "client_ledger_heads": {c: hidden[2]["client_ledger_heads"][c] for c in shown}}
    _rewrite(run / "ledgers" / "server", hidden)
    code, payload = _audit(run)
    assert code == 0  # consistent with itself
    code, payload = _audit(run, *finished[2].values())
    assert code == 1 and _receipted(payload) == set(shown)
    assert any(p.startswith("client-1 round 3 (trained, record 3): covered by its receipt, missing")
               for p in payload["problems"]), payload["problems"]


def test_rolling_the_whole_directory_back_is_caught_by_receipts(finished):
    _, snapshot, receipts = finished  # the run directory exactly as it was after round 2
    code, payload = _audit(snapshot)
    assert code == 0 and any("stopped after round 2 of 3" in note for note in payload["notes"])
    code, payload = _audit(snapshot, *receipts.values())
    assert code == 1
    for client in CLIENTS:
        assert any(p.startswith(f"{client} round 3") for p in payload["problems"]), payload["problems"]


def test_a_wrong_run_json_is_caught_with_and_without_receipts(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    (run / "run.json").write_text(json.dumps({"run_id": "0" * 32}) + "\n")
    code, payload = _audit(run)
    assert code == 1
    assert any("run.json names 00000000" in p for p in payload["problems"]), payload["problems"]
    assert any("client-0's ledger has no record of run 00000000" in p for p in payload["problems"])
    code, payload = _audit(run, finished[2]["client-0"])
    assert any(p.startswith("receipt client-0.receipt.json: for run ") and "this run is 00000000" in p
               for p in payload["problems"]), payload["problems"]


def test_a_replaced_adapter_is_caught(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    code, payload = _audit(run, *finished[2].values())
    assert code == 1
    assert any("adapter/adapter_model.safetensors: differs from the file the server signed after round 3" in p
               for p in payload["problems"]), payload["problems"]


def test_bad_receipts_are_one_line_errors_or_findings_naming_the_file(finished, tmp_path):
    run, _, receipts = finished
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "fedtune-receipt/1", "receipt": {"client_id": 3}}')
    result = fedtune("audit", str(run), f"--receipt={broken}")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert f"receipt {broken}: not a fedtune receipt" in " ".join(result.stderr.split())
    infinite = json.loads(receipts["client-0"].read_text())
    infinite["receipt"]["epsilon"] = 1e999  # json writes Infinity
    (tmp_path / "infinite.json").write_text(json.dumps(infinite))
    result = fedtune("audit", str(run), f"--receipt={tmp_path / 'infinite.json'}")
    assert result.returncode == 3 and "Traceback" not in result.stderr and "not a fedtune receipt" in result.stderr
    stranger = json.loads(receipts["client-0"].read_text())
    stranger["receipt"]["client_id"] = "client-9"
    (tmp_path / "stranger.json").write_text(json.dumps(stranger))
    code, payload = _audit(run, tmp_path / "stranger.json")
    assert code == 1 and payload["problems"] == ["receipt stranger.json: client 'client-9' has no ledger in this run"]
    other_key = tmp_path / "other-ledger"
    shutil.copytree(run / "ledgers" / "client-1", other_key)
    for name in ("ledger.key", "ledger.pub"):
        shutil.copy(run / "ledgers" / "client-0" / name, other_key / name)  # client-0's key signs
    _rewrite(other_key, read_records(other_key / "ledger.jsonl"))
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    write_receipt(ledger_dir=other_key, run_id=run_id, out=tmp_path / "forged.json")
    code, payload = _audit(run, tmp_path / "forged.json")
    assert code == 1
    assert payload["problems"][0].startswith("receipt forged.json: not signed by client-1's ledger key")


@pytest.mark.slow
def test_the_mechanism_check_runs_from_the_audit_on_a_clients_recorded_step(finished):
    """`--mechanism CLIENT` reads the client's sigma, q and delta from its ledger and C from the run,
    runs its DP-SGD step on canaries, and puts the claim and the bound beside the audit."""
    run, _, _ = finished
    result = fedtune("audit", str(run), "--json", "--mechanism", "client-0")
    payload = json.loads(result.stdout)
    check = payload["mechanism"]["client-0"]
    last = [r for r in read_records(run / "ledgers" / "client-0" / "ledger.jsonl") if r["status"] == "trained"][-1]
    assert (check["noise_multiplier"], check["sample_rate"], check["delta"]) == \
        (last["noise_multiplier"], last["sample_rate"], last["delta"])
    assert not check["finding"] and result.returncode == 0
    assert 0 < check["tightest_lower"] <= check["tightest_claim"]
    assert check["lower_epsilon"] <= check["claim_epsilon"]


def test_a_receipt_never_vouches_for_the_server_ledger(finished, tmp_path):
    """client-0's real ledger put in place of the server's (and its own folder removed): its receipt
    would verify there, and the server's ledger is never audited for spend. It matches nothing."""
    run = _copy(finished[0], tmp_path)
    shutil.rmtree(run / "ledgers" / "server")
    shutil.move(run / "ledgers" / "client-0", run / "ledgers" / "server")
    code, payload = _audit(run, finished[2]["client-0"])
    assert code == 1
    assert "receipt client-0.receipt.json: client 'client-0' has no ledger in this run" in payload["problems"]
    assert not _receipted(payload)


def test_a_forged_everyone_refused_round_is_caught(finished, tmp_path):
    """The operator (it holds the server key) re-signs round 3 as "every client refused", which would
    explain a run ending early; each client's own signed record says it trained."""
    run = _copy(finished[0], tmp_path)
    server = [dict(r) for r in read_records(run / "ledgers" / "server" / "ledger.jsonl")]
    server[2] = {**server[2], "trained": [], "refused": list(CLIENTS)}
    _rewrite(run / "ledgers" / "server", server)
    code, payload = _audit(run)
    assert code == 1
    for client in CLIENTS:
        assert f"server round 3: records {client} as refusing, {client} signed trained" in payload["problems"]
