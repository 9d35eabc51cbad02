"""Ledgers and `fedtune audit` / `fedtune plan` on a real DP + SecAgg+ simulation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedtune.common.ledger.audit import audit_run
from fedtune.common.ledger.chain import Ledger, read_records
from fedtune.common.privacy.accounting import epsilon_of
from fedtune.common.run_data import federated_splits
from tests.helpers import fedtune, read_metrics

ROUNDS = (1, 2, 3)


@pytest.fixture(scope="module")
def dp_run(finished_dp_run):
    """The session's finished 3-client, 3-round DP-SGD + SecAgg+ run of the tiny model (tests/conftest.py)."""
    return finished_dp_run.config, finished_dp_run.path


def _audit(target: Path, *extra: str):
    result = fedtune("audit", str(target), "--json", *extra)
    payload = json.loads(result.stdout) if result.stdout.strip().startswith("{") else None
    return result, payload


def _lines(run: Path, owner: str) -> tuple[Path, list[str]]:
    path = run / "ledgers" / owner / "ledger.jsonl"
    return path, path.read_text().splitlines()


def test_the_run_audits_clean_and_every_epsilon_matches_the_independent_accountant(dp_run):
    config, run = dp_run
    result, payload = _audit(run)
    assert result.returncode == 0 and payload["verdict"] == "consistent", result.stdout[-3000:]
    rows = payload["rows"]
    assert sorted((r["client_id"], r["round"]) for r in rows) == [
        (f"client-{c}", r) for c in range(3) for r in ROUNDS]
    for row in rows:
        assert row["status"] == "trained"
        assert row["recomputed_epsilon"] == pytest.approx(row["claimed_epsilon"], rel=0.01)
        assert row["claimed_epsilon"] <= 5.0
    metrics = read_metrics(run)
    for row in rows:  # what the client signed is what the run reported
        assert metrics[row["round"] - 1]["clients"][row["client_id"]]["epsilon"] == row["claimed_epsilon"]
    pinned = [f"--public-key=client-{c}={run / 'ledgers' / f'client-{c}' / 'ledger.pub'}" for c in range(3)]
    result, payload = _audit(run, *pinned)
    assert result.returncode == 0 and all(l["key_pinned"] for l in payload["ledgers"] if l["owner"] != "server")
    # pinned, but the private halves lie in this simulated run's directory: consistent, not attested
    assert payload["attested"] is False and payload["verdict_text"].startswith("consistent (not independently")


def test_ledger_records_carry_what_an_auditor_needs(dp_run):
    _, run = dp_run
    records = read_records(run / "ledgers" / "client-0" / "ledger.jsonl")
    for key in ("run_id", "round", "status", "sample_rate", "noise_multiplier", "steps", "accountant", "epsilon",
                "delta", "budget_remaining", "num_examples", "prev_hash", "signature"):
        assert key in records[0], key
    assert records[1]["budget_remaining"] == pytest.approx(5.0 - records[1]["epsilon"])
    assert (run / "ledgers" / "client-0" / "ledger.key").stat().st_mode & 0o077 == 0  # owner-only
    *server, saved = read_records(run / "ledgers" / "server" / "ledger.jsonl")
    assert [r["round"] for r in server] == list(ROUNDS)
    assert saved["event"] == "adapter-saved" and saved["adapter_sha256"] == server[-1]["adapter_sha256"]
    assert "adapter_model.safetensors" in saved["files"]
    assert server[0]["aggregation"] == "secagg+" and server[0]["trained"] == ["client-0", "client-1", "client-2"]
    assert len(server[1]["adapter_sha256"]) == 64 and server[0]["adapter_sha256"] != server[1]["adapter_sha256"]


def _change_epsilon(line: str, factor: float) -> str:
    record = json.loads(line)
    record["epsilon"] = record["epsilon"] * factor
    return json.dumps(record)


def _splice_foreign(run: Path, lines: list[str]) -> list[str]:
    """Replace record 2 by a validly signed record of another run (another ledger, another key)."""
    foreign = Ledger(run.parent / "foreign-ledger")
    fields = {k: v for k, v in json.loads(lines[1]).items() if k not in ("seq", "prev_hash", "signature")}
    fields["run_id"] = "another-run"
    foreign.append({**fields, "round": 1})
    foreign.append(fields)
    return [lines[0], json.dumps(foreign.records[1])]


@pytest.mark.parametrize("tamper, owner, expected", [
    ("change-number", "client-1", "client-1 record 2 (round 2): signature does not verify"),
    ("delete-record", "client-0", "client-0 record 1 (round 2): sequence number 1 where 0 was expected"),
    ("reorder", "client-2", "client-2 record 1 (round 2): sequence number 1 where 0 was expected"),
    ("replace-signature", "client-1", "client-1 record 1 (round 1): signature does not verify"),
    ("splice-other-run", "client-0", "client-0 record 2 (round 2): previous-record hash does not match"),
    ("swap-key", "client-2", "client-2 record 1 (round 1): signature does not verify"),
])
def test_tampering_is_caught_and_names_the_record(finished_dp_run_copy, tmp_path, tamper, owner, expected):
    run = finished_dp_run_copy
    path, lines = _lines(run, owner)
    if tamper == "change-number":
        lines[1] = _change_epsilon(lines[1], 0.5)
    elif tamper == "delete-record":
        lines = lines[1:]
    elif tamper == "reorder":
        lines = [lines[1], lines[0]]
    elif tamper == "replace-signature":
        first, second = json.loads(lines[0]), json.loads(lines[1])
        first["signature"] = second["signature"]
        lines[0] = json.dumps(first)
    elif tamper == "splice-other-run":
        lines = _splice_foreign(run, lines)
    elif tamper == "swap-key":
        other = Ledger(tmp_path / "other-key")
        shutil.copy(other.directory / "ledger.pub", path.parent / "ledger.pub")
    path.write_text("\n".join(lines) + "\n")
    # In-process (the CLI's exit code is tested above): the PLD recomputations are cached across cases.
    payload = audit_run(target=run).to_json()
    assert payload["exit_code"] == 1 and payload["verdict"] == "verification failed"
    assert any(expected in problem for problem in payload["problems"]), payload["problems"]


def _resign(folder: Path, edit=lambda record: record) -> None:
    """Rewrite a ledger with a brand-new key, as whoever holds the files could."""
    records = read_records(folder / "ledger.jsonl")
    shutil.rmtree(folder)
    forged = Ledger(folder)
    for record in records:
        forged.append(edit({k: v for k, v in record.items() if k not in ("seq", "prev_hash", "signature")}))


def test_a_resigned_ledger_is_caught_by_the_server_record_and_by_a_pinned_key(finished_dp_run_copy, tmp_path):
    run = finished_dp_run_copy
    pinned = tmp_path / "client-0.pub"
    shutil.copy(run / "ledgers" / "client-0" / "ledger.pub", pinned)
    _resign(run / "ledgers" / "client-0")
    result, payload = _audit(run)
    assert result.returncode == 1
    assert any("client-0's ledger head differs" in p for p in payload["problems"])
    alone, payload = _audit(run / "ledgers" / "client-0")  # on its own, a re-signed chain is consistent
    assert alone.returncode == 0
    result, payload = _audit(run / "ledgers" / "client-0", f"--public-key=client-0={pinned}")
    assert result.returncode == 1
    assert "client-0 record 1 (round 1): signature does not verify" in payload["problems"][0]


def test_an_under_reported_epsilon_is_flagged_against_the_recomputation(finished_dp_run_copy):
    run = finished_dp_run_copy
    _resign(run / "ledgers" / "client-1", lambda r: {**r, "epsilon": r["epsilon"] * 0.9})
    result, payload = _audit(run / "ledgers" / "client-1")
    assert result.returncode == 1
    assert [row["flags"] for row in payload["rows"]] == [["under-reported"]] * len(ROUNDS)
    assert "client-1 record 2 (round 2): claims epsilon" in payload["problems"][1]


def test_the_server_recording_a_different_epsilon_is_caught(finished_dp_run_copy):
    run = finished_dp_run_copy
    _resign(run / "ledgers" / "server",  # the round records (the last record is the saved adapter's)
            lambda r: {**r, "epsilon": {**r["epsilon"], "client-2": 0.1}} if "epsilon" in r else r)
    result, payload = _audit(run)
    assert result.returncode == 1
    assert any("server record 1 (round 1): records epsilon 0.1 for client-2, which signed" in p
               for p in payload["problems"])


def test_a_budget_breach_exits_2(tmp_path):
    ledger = Ledger(tmp_path / "client-0")
    history = []
    for server_round in (1, 2):
        history.append((0.5, 0.1, 50))
        epsilon = epsilon_of([(0.5, 0.1, 50 * server_round)], delta=1e-5)
        ledger.append({"kind": "client", "client_id": "client-0", "run_id": "r", "round": server_round,
                       "status": "trained", "dp": True, "steps": 50, "local_examples": 320,
                       "num_examples": 320, "sample_rate": 0.1, "noise_multiplier": 0.5, "steps_per_round": 50,
                       "planned_rounds": 2, "accountant": "prv", "delta": 1e-5, "target_epsilon": 3.0,
                       "epsilon": epsilon, "budget_remaining": 3.0 - epsilon})
    result, payload = _audit(tmp_path / "client-0")
    assert result.returncode == 2 and payload["verdict"] == "budget exceeded"
    assert payload["budget_exceeded"][0].startswith("client-0 record 1 (round 1): epsilon")


@pytest.mark.parametrize("case, expected", [
    ("not-a-run", "is not a fedtune run directory or ledger"),
    ("truncated-line", "line 2 is not valid JSON"),
    ("unknown-key-file", "public key file not found"),
    ("key-for-nobody", "--public-key names client-9"),
    ("not-utf8", "is not UTF-8 text"),
])
def test_bad_audit_input_is_a_one_line_error(finished_dp_run_copy, tmp_path, case, expected):
    run = finished_dp_run_copy
    extra = []
    target = run
    if case == "not-a-run":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "truncated-line":
        path, lines = _lines(run, "client-0")
        path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2] + "\n")
    elif case == "unknown-key-file":
        extra = [f"--public-key=client-0={tmp_path / 'missing.pub'}"]
    elif case == "key-for-nobody":
        extra = [f"--public-key=client-9={run / 'ledgers' / 'client-0' / 'ledger.pub'}"]
    elif case == "not-utf8":
        (run / "ledgers" / "client-1" / "ledger.jsonl").write_bytes(b"\xff\xfe\x00 not a ledger\n")
    result = fedtune("audit", str(target), *extra)
    assert result.returncode not in (0, 2)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.parametrize("case, expected", [
    ("nan-epsilon", "client-0 record 2 (round 2): not canonical JSON"),
    ("string-round", "client-1 record 1 (round one): malformed record (field 'round' is 'one', not a int)"),
    ("no-server-ledger", "has client ledgers but no server ledger"),
    ("last-server-record-removed", "metrics.jsonl lists rounds [1, 2, 3], the server ledger [1, 2]"),
])
def test_malformed_or_truncated_ledgers_fail_verification_cleanly(finished_dp_run_copy, case, expected):
    run = finished_dp_run_copy
    if case == "nan-epsilon":
        path, lines = _lines(run, "client-0")
        lines[1] = lines[1].replace('"epsilon":', '"epsilon":NaN,"was":', 1)
        path.write_text("\n".join(lines) + "\n")
    elif case == "string-round":
        path, lines = _lines(run, "client-1")
        lines[0] = lines[0].replace('"round":1', '"round":"one"', 1)
        path.write_text("\n".join(lines) + "\n")
    elif case == "no-server-ledger":
        shutil.rmtree(run / "ledgers" / "server")
    elif case == "last-server-record-removed":
        path, lines = _lines(run, "server")
        path.write_text("\n".join(lines[:2]) + "\n")
    result, payload = _audit(run)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]
    assert any(expected in problem for problem in payload["problems"]), payload["problems"]


def test_report_writes_markdown_html_and_plots(dp_run, finished_dp_run_copy):
    config, _ = dp_run
    run = finished_dp_run_copy
    result = fedtune("audit", str(run), "--report")
    assert result.returncode == 0, result.stderr
    for name in ("report.md", "report.html", "epsilon_per_round.png", "test_accuracy.png"):
        assert (run / name).is_file(), name
    for name in ("epsilon_per_round.png", "test_accuracy.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report.html").read_text()
    # a simulation: every private key is in the run directory, so the verdict is never "clean"
    assert '<img src="data:image/png;base64,' in html and "consistent (not independently attested" in html
    markdown = (run / "report.md").read_text()
    assert markdown.startswith("# Privacy report: consistent (not independently attested")
    assert "| client-2 | 3 | trained |" in markdown
    assert f"| {config.target_delta:g} | one training record |" in markdown


def test_plan_and_run_agree_exactly(dp_run):
    config, run = dp_run
    splits = federated_splits(config.with_overrides(num_clients=3, clients_per_round=3))
    for cid in range(3):
        records = read_records(run / "ledgers" / f"client-{cid}" / "ledger.jsonl")
        result = fedtune("plan", "--json", "--target-epsilon", "5", "--delta", str(config.target_delta),
                         "--dataset-size", str(len(splits.clients[cid].train)),
                         "--batch-size", str(config.batch_size), "--local-epochs", "1", "--rounds", str(len(ROUNDS)),
                         "--mode", config.training_mode)
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert plan["noise_multiplier"] == records[0]["noise_multiplier"]
        assert plan["sample_rate"] == records[0]["sample_rate"]
        assert [r["epsilon"] for r in plan["rounds"]] == [r["epsilon"] for r in records]


def test_the_quick_recomputation_is_a_close_upper_bound_and_composes_like_dp_accounting():
    """The audit recomputes at a coarser discretization (10x faster) and confirms at the default
    before flagging: the quick value must bound the precise one from above, within 1%."""
    from dp_accounting import dp_event, pld

    from fedtune.common.privacy.accounting import QUICK_INTERVAL, independent_epsilon

    for history in ([(0.8148193359375, 0.1855072463768116, 15)], [(0.5, 0.05, 200)], [(2.0, 0.01, 10)],
                    [(0.8148193359375, 0.1855072463768116, 5), (0.9, 0.1, 7)]):
        precise = independent_epsilon(history, 1e-5)
        assert precise <= independent_epsilon(history, 1e-5, interval=QUICK_INTERVAL) <= precise * 1.01
    accountant = pld.PLDAccountant()  # the library's own composition of the same two-part history
    accountant.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
        for s, q, n in history]))
    assert independent_epsilon(history, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
