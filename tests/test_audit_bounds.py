"""Issue 29, items 5, 7 and 8 (the audit's part): what travels with the adapter, what the audit's
verdict may claim, and inputs another party hands over, read in bounded time and memory.

The session's one finished 3-client, 3-round DP-SGD + SecAgg+ federation (tests/conftest.py,
finished_dp_run: simulations/inprocess.py, the tiny model), a copy of its directory as it was after
round 2 (a roll-back), and the CLI run in-process (fedtune.main.run_cli).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from fedtune.common.bounded_json import MAX_BYTES, TooLarge, nesting_depth, read_json_file
from fedtune.common.ledger.chain import Ledger, read_records
from fedtune.common.ledger.receipts import write_receipt
from fedtune.common.ledger.recompute import MAX_AUDITED_STEPS, ClientRecomputation, Recomputation, TooLarge as PLDTooLarge
from fedtune.common.privacy.accounting import PRECISE_INTERVAL, QUICK_INTERVAL, independent_epsilon
from fedtune.main import run_cli
from tests.conftest import FINISHED_CLIENTS as CLIENTS

NOT_ATTESTED = "consistent (not independently attested: the private keys of every client ledger are in the run"


@pytest.fixture(scope="module")
def finished(finished_dp_run):
    """The finished run, and a copy of its directory as it was after round 2."""
    return finished_dp_run.path, finished_dp_run.after_round_2


def _run_id(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["run_id"]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def _audit_json(capsys, run: Path, *extra: str) -> tuple[int, dict]:
    code, out, err = _cli(capsys, "audit", run, "--json", *extra)
    assert out.strip().startswith("{"), err
    return code, json.loads(out)


def _institutions_hold_their_keys(run: Path, tmp_path: Path) -> dict[str, Path]:
    """A deployment's shape: each institution's private key moved out of the directory; returns the
    public keys they hand the auditor themselves."""
    keys = {}
    for client in CLIENTS:
        home = tmp_path / "institutions" / client
        home.mkdir(parents=True, exist_ok=True)
        shutil.move(run / "ledgers" / client / "ledger.key", home / "ledger.key")
        keys[client] = Path(shutil.copy(run / "ledgers" / client / "ledger.pub", home / "ledger.pub"))
    return keys


# -- item 5: the model card states totals only ------------------------------------------------------

def test_the_card_of_a_real_run_gives_no_clients_record_count(finished):
    run, _ = finished
    card = (run / "adapter" / "README.md").read_text()
    records = [r for client in CLIENTS for r in read_records(run / "ledgers" / client / "ledger.jsonl")
               if r["status"] == "trained"]
    counts = {r["local_examples"] for r in records} | {r["num_examples"] for r in records}
    words = set(re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", card))
    for count in counts:
        assert str(count) not in words, f"a client's record count {count} is on the card"
    for record in records:  # q = batch / N, sigma from q, steps = epochs * N / batch: none on the card
        for value in (record["sample_rate"], record["noise_multiplier"]):
            for text in (repr(value), f"{value:.4g}", f"{value:.4f}", f"{value:.3g}"):
                assert text not in card, (text, value)
    assert "q (sample rate)" not in card and "| client" not in card
    assert not any(client in card for client in CLIENTS)
    sizes = {r["client_id"]: r["local_examples"] for r in records}
    for total in (sum(sizes.values()), *(n * len(sizes) for n in sizes.values())):  # nor a total (K x N when even)
        assert str(total) not in words, f"a record total {total} is on the card"
    assert "largest epsilon any client spent:" in card
    assert f"{len(CLIENTS)} of {len(CLIENTS)} clients trained on their own data" in card


# -- item 7: the verdict never says more than what it rests on ---------------------------------------

def test_a_rolled_back_run_with_receipts_from_the_directorys_own_keys_is_not_clean(finished, tmp_path, capsys):
    """The operator rolls the directory back to round 2 and signs receipts with the keys lying in it."""
    _, snapshot = finished
    run = Path(shutil.copytree(snapshot, tmp_path / "rolled-back"))
    forged = []
    for client in CLIENTS:
        forged.append(tmp_path / f"{client}.json")
        write_receipt(ledger_dir=run / "ledgers" / client, run_id=_run_id(run), out=forged[-1])
    receipts = [f"--receipt={r}" for r in forged]
    code, payload = _audit_json(capsys, run, *receipts)
    assert code == 0 and payload["verdict_text"].startswith(NOT_ATTESTED), payload["verdict_text"]
    assert payload["attested"] is False and not [c for c in payload["ledgers"] if c["receipted"]]
    trust = " ".join(payload["trust"])
    assert "verifies only under a key from this directory (not an institution's attestation" in trust
    # pinning the directory's own public keys changes nothing: their private halves are in it
    pins = [f"--public-key={c}={run / 'ledgers' / c / 'ledger.pub'}" for c in CLIENTS]
    code, payload = _audit_json(capsys, run, *receipts, *pins)
    assert code == 0 and payload["verdict_text"].startswith(NOT_ATTESTED) and payload["attested"] is False
    assert "its private half is inside this directory" in " ".join(payload["trust"])
    code, out, _ = _cli(capsys, "audit", run, *receipts)  # the terminal's verdict line says the same
    assert code == 0 and "Verdict: consistent (not independently attested" in " ".join(out.split())
    assert "Verdict: clean" not in out


def test_clean_needs_the_institutions_keys_and_then_their_receipts_catch_the_roll_back(finished, tmp_path, capsys):
    run, snapshot = finished
    honest = Path(shutil.copytree(run, tmp_path / "honest"))
    receipts = [tmp_path / f"{c}.json" for c in CLIENTS]
    for client, receipt in zip(CLIENTS, receipts):  # each institution signs at its node, then keeps its key
        write_receipt(ledger_dir=honest / "ledgers" / client, run_id=_run_id(honest), out=receipt)
    keys = _institutions_hold_their_keys(honest, tmp_path)
    pins = [f"--public-key={c}={keys[c]}" for c in CLIENTS]
    given = [f"--receipt={r}" for r in receipts]
    code, payload = _audit_json(capsys, honest, *pins, *given)
    assert code == 0 and payload["verdict_text"] == "clean" and payload["attested"] is True, payload["trust"]
    assert {c["owner"] for c in payload["ledgers"] if c["receipted"]} == set(CLIENTS)
    rolled = Path(shutil.copytree(snapshot, tmp_path / "rolled"))
    for client in CLIENTS:
        (rolled / "ledgers" / client / "ledger.key").unlink()
    code, payload = _audit_json(capsys, rolled, *pins, *given)
    assert code == 1 and payload["verdict"] == "verification failed"
    for client in CLIENTS:
        assert any(p.startswith(f"{client} round 3") for p in payload["problems"]), payload["problems"]


# -- item 8: hostile inputs: one error line, exit 3, bounded memory ----------------------------------

def _deep(path: Path, depth: int = 100_000) -> Path:
    path.write_text("[" * depth + "]" * depth)
    return path


def test_a_receipt_of_100000_nested_brackets_is_one_error_line(finished, tmp_path, capsys):
    run, _ = finished
    code, out, err = _cli(capsys, "audit", run, "--receipt", _deep(tmp_path / "deep.json"))
    assert code == 3 and err.startswith("error: receipt ") and "nested deeper than 32 levels" in err
    assert "Traceback" not in err and "unexpected" not in err and "[[" not in err and err.count("error:") == 1
    huge = tmp_path / "huge.json"
    huge.write_text('{"format": "' + "x" * (MAX_BYTES + 10) + '"}')
    code, _, err = _cli(capsys, "audit", run, "--receipt", huge)
    assert code == 3 and f"larger than {MAX_BYTES} bytes" in err and "xxx" not in err


def test_a_roster_of_100000_nested_brackets_is_one_error_line(tmp_path, capsys):
    code, out, err = _cli(capsys, "roster", "check", _deep(tmp_path / "roster.json"))
    assert code == 3 and err.startswith("error: roster ") and "nested deeper than 32 levels" in err
    assert "Traceback" not in err and "unexpected" not in err and "[[" not in err and err.count("error:") == 1


def test_a_ledger_line_of_100000_nested_brackets_is_one_error_line(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished[0], tmp_path / "deep-ledger"))
    with (run / "ledgers" / "client-0" / "ledger.jsonl").open("a") as handle:
        handle.write("[" * 100_000 + "]" * 100_000 + "\n")
    code, _, err = _cli(capsys, "audit", run)
    assert code == 3 and "nests too deep for a ledger record" in err and "Traceback" not in err and "[[" not in err


def test_the_bounded_reader_ignores_brackets_inside_strings_and_reads_real_files(tmp_path):
    assert nesting_depth('{"a": [1, {"b": "[[[\\"[{"}]}') == 3
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"members": {"a": "[[[["}, "x": [[1]]}))
    assert read_json_file(path)["members"]["a"] == "[[[["
    with pytest.raises(TooLarge):
        read_json_file(_deep(tmp_path / "d.json", 33))


def test_a_resigned_ledger_claiming_a_billion_steps_is_a_failed_check_not_a_computation(finished, tmp_path,
                                                                                         capsys):
    """The operator re-signs client-0's last round with 10^9 steps (in a simulation it holds the key)."""
    run = Path(shutil.copytree(finished[0], tmp_path / "billion"))
    folder = run / "ledgers" / "client-0"
    records = read_records(folder / "ledger.jsonl")
    records[-1] = {**records[-1], "steps": 10 ** 9}
    for name in ("ledger.jsonl", "ledger.head"):
        (folder / name).unlink()
    ledger = Ledger(folder)
    for record in records:
        ledger.append({k: v for k, v in record.items() if k not in ("seq", "prev_hash", "signature")})
    started = time.monotonic()
    code, payload = _audit_json(capsys, run)
    assert time.monotonic() - started < 120
    assert code == 1 and payload["verdict"] == "verification failed"
    last = len(records)
    assert any(p.startswith(f"client-0 record {last} (round 3): not recomputed: its history holds more than "
                            f"{MAX_AUDITED_STEPS:,} DP steps") for p in payload["problems"]), payload["problems"]
    row = [r for r in payload["rows"] if r["client_id"] == "client-0"][-1]
    assert row["recomputed_epsilon"] is None and "not recomputed" in row["flags"]
    assert all(r["recomputed_epsilon"] is not None for r in payload["rows"] if r["client_id"] == "client-1")


def test_composing_record_by_record_gives_the_independent_accountants_value():
    history = [(1.1, 0.05, 40), (1.1, 0.05, 40), (0.8, 0.2, 7), (1.1, 0.05, 40)]
    quick, precise = Recomputation(interval=QUICK_INTERVAL), Recomputation(interval=PRECISE_INTERVAL)
    for upto in range(1, len(history) + 1):
        assert quick.epsilon(history[:upto], 1e-5) == independent_epsilon(history[:upto], 1e-5,
                                                                           interval=QUICK_INTERVAL)
    assert precise.epsilon(history, 1e-5) == independent_epsilon(history, 1e-5)
    assert Recomputation(interval=QUICK_INTERVAL).epsilon([(0.0, 1.0, 1), (1.0, 0.1, 5)], 1e-5) == float("inf")


@pytest.mark.parametrize("entry, reason", [
    ((1.0, 1.0, 900_000), "privacy loss distribution of over"),  # within the step cap, too wide at q = 1
    ((1e-4, 0.5, 1), "noise multiplier too small"),
    ((1.0, 0.06, 2 * MAX_AUDITED_STEPS), "DP steps in all"),
])
def test_a_history_past_the_bounds_is_refused_before_it_is_computed(entry, reason):
    started = time.monotonic()
    with pytest.raises(PLDTooLarge, match=reason):
        ClientRecomputation().quick_epsilon([entry], 1e-5)
    assert time.monotonic() - started < 10
