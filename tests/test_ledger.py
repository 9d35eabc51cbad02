"""The ledger refuses to be extended once it was shortened, replaced or edited."""

import json

import pytest

from fedtune.common.ledger.chain import HEAD_FILE, LEDGER_FILE, Ledger, LedgerError, load_public_key, read_records, verify_records
from fedtune.common.errors import FedtuneError


def _ledger_with(tmp_path, n=3) -> Ledger:
    ledger = Ledger(tmp_path)
    for i in range(n):
        ledger.append({"round": i + 1, "epsilon": 0.5 * (i + 1), "loss": float("nan")})
    return ledger


def test_records_chain_and_reload(tmp_path):
    ledger = _ledger_with(tmp_path)
    again = Ledger(tmp_path)
    assert again.records == ledger.records and again.head_hash == ledger.head_hash
    assert [r["seq"] for r in again.records] == [0, 1, 2]
    assert again.records[0]["loss"] is None  # NaN is stored as null, never as invalid JSON


def test_removing_the_last_record_is_refused(tmp_path):
    _ledger_with(tmp_path)
    path = tmp_path / LEDGER_FILE
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    # the shortened chain is still internally consistent: only the head marker shows the loss
    assert verify_records(path, read_records(path), load_public_key(tmp_path / "ledger.pub")).ok
    with pytest.raises(LedgerError, match="holds 2 records but its head marker ledger.head says 3"):
        Ledger(tmp_path)


def test_deleting_the_ledger_file_is_refused(tmp_path):
    _ledger_with(tmp_path)
    (tmp_path / LEDGER_FILE).unlink()
    with pytest.raises(LedgerError, match="holds 0 records"):
        Ledger(tmp_path)


def test_ledger_without_its_key_cannot_be_extended(tmp_path):
    _ledger_with(tmp_path)
    (tmp_path / "ledger.key").unlink()
    with pytest.raises(LedgerError, match="signing key .* is missing"):
        Ledger(tmp_path)


def test_an_edited_record_is_refused_by_its_owner(tmp_path):
    _ledger_with(tmp_path)
    path = tmp_path / LEDGER_FILE
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["epsilon"] = 0.01
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="record 2 \\(round 2\\): signature does not verify"):
        Ledger(tmp_path)


def test_non_utf8_ledger_is_a_user_error(tmp_path):
    path = tmp_path / LEDGER_FILE
    path.write_bytes(b"\xff\xfe garbage\n")
    with pytest.raises(FedtuneError, match="not UTF-8"):
        read_records(path)


def test_head_marker_is_written_after_each_append(tmp_path):
    ledger = _ledger_with(tmp_path, n=2)
    head = json.loads((tmp_path / HEAD_FILE).read_text())
    assert head == {"seq": 1, "hash": ledger.head_hash}


def test_a_kill_between_append_and_head_keeps_the_signed_record(tmp_path):
    ledger = _ledger_with(tmp_path, n=2)
    head = (tmp_path / HEAD_FILE).read_text()
    ledger.append({"round": 3, "epsilon": 1.5})
    (tmp_path / HEAD_FILE).write_text(head)  # as if killed before the head moved
    again = Ledger(tmp_path)
    assert [r["round"] for r in again.records] == [1, 2, 3]  # the spend is kept, not refused or lost
    assert json.loads((tmp_path / HEAD_FILE).read_text())["seq"] == 2
    # but a head two records behind is still a ledger that was tampered with
    (tmp_path / HEAD_FILE).write_text(json.dumps({"seq": 0, "hash": "x"}))
    with pytest.raises(LedgerError, match="head marker"):
        Ledger(tmp_path)


def test_a_kill_before_the_first_head_keeps_the_first_record(tmp_path):
    """Killed before the first head marker was written: the record is kept and the marker written
    again, so the ledger is guarded from then on (emptying it is refused, as for any ledger)."""
    Ledger(tmp_path).append({"round": 1, "epsilon": 0.5})
    (tmp_path / HEAD_FILE).unlink()
    again = Ledger(tmp_path)
    assert [r["round"] for r in again.records] == [1]
    assert (tmp_path / HEAD_FILE).exists(), "the head marker was not written again"
    assert json.loads((tmp_path / HEAD_FILE).read_text()) == {"seq": 0, "hash": again.head_hash}
    (tmp_path / LEDGER_FILE).write_text("")  # the first record removed
    with pytest.raises(LedgerError, match="head marker"):
        Ledger(tmp_path)
