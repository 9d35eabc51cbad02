"""Round bookkeeping and the wire contract as pure functions: milliseconds, no Flower, no model.

The round record, the server-ledger record and the summary are checked field by field, and
against the shape of a run made before the code was reorganised (tests/fixtures/), whose
ledgers must still verify.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from fedtune.common.protocol import (CLEAR_FIT_FIELDS, EvaluateInstructions, EvaluateReport, FitInstructions, FitReport,
                             Status)
from fedtune.common.tasks import get_task
from fedtune.server.bookkeeping import (every_client_refused, round_record, run_summary, server_ledger_record,
                                upload_bytes)
from fedtune.server.strategy import Evaluation, FitReply, RoundOutcome
from tests.helpers import run_fedtune

BEFORE = Path(__file__).parent / "fixtures" / "run-made-before-the-layout-change"
CLASSIFICATION = get_task("classification")


def _report(cid: str, *, status=Status.TRAINED, epsilon=1.5, **extra) -> FitReport:
    values = dict(client_id=cid, server_round=2, status=status, steps=5 if status == Status.TRAINED else 0,
                  train_loss=0.7 if status == Status.TRAINED else math.nan, update_max_abs=0.25, epsilon=epsilon,
                  noise_multiplier=0.8, sample_rate=0.2, target_epsilon=8.0, ledger_head=f"head-{cid}")
    return FitReport(**{**values, **extra})


def _outcome() -> RoundOutcome:
    return RoundOutcome(
        sampled=3, failures=1, applied=True,
        replies={"client-1": FitReply(report=_report("client-1", lora_a_sha256="aa"), num_examples=40),
                 "client-0": FitReply(report=_report("client-0", status=Status.REFUSED_BUDGET, epsilon=7.9),
                                      num_examples=0)},
        evaluations={"client-1": Evaluation(loss=0.5, scores={"accuracy": 0.9, "macro_f1": 0.8})},
        rejected={"client-1": "contains NaN or Inf"})


def test_round_record_lists_every_reply_in_client_order_with_its_validation():
    record = round_record(server_round=2, outcome=_outcome(), test_scores={"loss": 0.4, "accuracy": 0.91,
                                                                           "macro_f1": 0.88},
                          task=CLASSIFICATION, seconds=1.23456, bytes_up=1000, secure_aggregation=True)
    assert record["round"] == 2 and record["seconds"] == 1.235 and record["aggregation"] == "secagg+"
    assert (record["test_loss"], record["test_accuracy"], record["test_macro_f1"]) == (0.4, 0.91, 0.88)
    assert record["clients_sampled"] == 3 and record["clients_trained"] == 1 and record["failures"] == 1
    assert list(record["clients"]) == ["client-0", "client-1"]
    trained = record["clients"]["client-1"]
    assert trained == {"status": "trained", "epsilon": 1.5, "noise_multiplier": 0.8, "sample_rate": 0.2,
                       "steps": 5, "train_loss": 0.7, "num_examples": 40, "update_max_abs": 0.25,
                       "lora_a_sha256": "aa", "rejected": "contains NaN or Inf", "val_loss": 0.5,
                       "val_accuracy": 0.9, "val_macro_f1": 0.8}
    assert "ledger_head" not in trained and "client_id" not in trained  # those go to the ledger, not metrics
    assert record["clients"]["client-0"]["status"] == "refused-budget"


def test_round_record_has_the_shape_of_a_run_made_before_the_change():
    before = json.loads((BEFORE / "metrics.jsonl").read_text().splitlines()[0])
    record = round_record(server_round=1, outcome=_outcome(), test_scores={"loss": 1.0, "accuracy": 0.5,
                                                                           "macro_f1": 0.4},
                          task=CLASSIFICATION, seconds=1.0, bytes_up=1, secure_aggregation=True)
    added = ("test_largest_class_share", "test_predicted_classes")  # since: how the test predictions spread
    assert [key for key in record if key not in added] == list(before)
    assert list(record).index("test_largest_class_share") == list(record).index("test_macro_f1") + 1
    entry_before = before["clients"]["client-0"]
    entry_now = record["clients"]["client-1"]
    assert [k for k in entry_now if k in entry_before] == list(entry_before)


def test_server_ledger_record_names_who_trained_and_what_each_reported():
    outcome = _outcome()
    record = round_record(server_round=2, outcome=outcome, test_scores={"loss": 0.4, "accuracy": 0.91},
                          task=CLASSIFICATION, seconds=1.0, bytes_up=1, secure_aggregation=False)
    fields = server_ledger_record(run_id="run-9", record=record, outcome=outcome, adapter_sha256="ff",
                                  task=CLASSIFICATION)
    assert fields["kind"] == "server" and fields["run_id"] == "run-9" and fields["round"] == 2
    assert fields["replied"] == ["client-0", "client-1"]
    assert fields["trained"] == ["client-1"] and fields["refused"] == ["client-0"]
    assert fields["epsilon"] == {"client-0": 7.9, "client-1": 1.5}
    assert fields["client_ledger_heads"] == {"client-0": "head-client-0", "client-1": "head-client-1"}
    assert fields["rejected"] == {"client-1": "contains NaN or Inf"}
    assert fields["aggregation"] == "plain" and fields["adapter_sha256"] == "ff"
    assert fields["test_accuracy"] == 0.91 and "test_macro_f1" not in fields
    before = json.loads((BEFORE / "ledgers" / "server" / "ledger.jsonl").read_text().splitlines()[0])
    # One field added since: why each refusing client refused (policy keys and limits, no data).
    assert set(fields) == set(before) - {"seq", "prev_hash", "signature"} | {"refusal_reasons"}


def test_a_round_where_every_sampled_client_refused_stops_the_run():
    refused = RoundOutcome(sampled=2, replies={
        cid: FitReply(report=_report(cid, status=Status.REFUSED_BUDGET), num_examples=0) for cid in ("a", "b")})
    assert every_client_refused(refused)
    assert not every_client_refused(_outcome())
    assert not every_client_refused(RoundOutcome(sampled=3, replies=dict(list(refused.replies.items()))))
    assert not every_client_refused(RoundOutcome())


def test_summary_takes_each_clients_latest_epsilon_and_the_tasks_scores():
    config = RunConfig(num_clients=2, clients_per_round=2)
    rounds = [{"test_accuracy": 0.5, "test_macro_f1": 0.4, "clients": {"a": {"epsilon": 1.0, "noise_multiplier": 0.9},
                                                                       "b": {"epsilon": 1.1}}},
              {"test_accuracy": 0.8, "test_macro_f1": 0.7, "clients": {"a": {"epsilon": 2.0}}}]
    summary = run_summary(task=CLASSIFICATION, config=config, rounds=rounds, initial_scores={"accuracy": 0.2},
                          seconds=12.345)
    assert summary["task"] == "classification" and summary["rounds_completed"] == 2
    assert summary["test_accuracy"] == 0.8 and summary["initial_test_accuracy"] == 0.2
    assert summary["epsilon"] == {"a": 2.0, "b": 1.1} and summary["noise_multiplier"] == {"a": 0.9}
    assert summary["target_epsilon"] == 8.0 and summary["seconds"] == 12.35
    lm = run_summary(task=get_task("causal-lm"), config=config, rounds=[{"test_loss": 2.0, "test_perplexity": 7.4,
                                                                         "clients": {}}],
                     initial_scores={"loss": 3.0, "perplexity": 20.1}, seconds=1)
    assert lm["test_perplexity"] == 7.4 and lm["base_perplexity"] == 20.1 and "test_accuracy" not in lm
    before = json.loads((BEFORE / "summary.json").read_text())
    assert [key for key in summary if key != "test_largest_class_share"] == list(before)  # added since


def test_secagg_uploads_int64_words_plus_a_weight():
    """The count is what a node sends: its masked vector (client/secagg_masking.py) as serialized,
    an int64 word per coordinate (4 bytes more than float32) plus the weight factor, one more word."""
    import numpy as np
    from flwr.common import ndarray_to_bytes

    from fedtune.client.secagg_masking import masked_update
    from fedtune.client.secagg_state import SecAggState

    arrays = [np.full((4, 8), 0.01, np.float32), np.full(3, -0.02, np.float32)]
    state = SecAggState(clipping_range=1.0, target_range=1 << 22, mod_range=1 << 32, max_weight=100.0,
                        rd_seed=b"\1" * 32)
    masked = masked_update(state, arrays, 30, masking_peers=[])
    assert [a.dtype for a in masked] == [np.dtype(np.int64)] * 3 and masked[0].shape == (1,)  # weight, then arrays
    assert upload_bytes(arrays, secure=True) == sum(len(ndarray_to_bytes(a)) for a in masked)
    weight_word = len(ndarray_to_bytes(np.zeros(1, np.int64)))
    assert upload_bytes(arrays, secure=True) - upload_bytes(arrays, secure=False) == 4 * (32 + 3) + weight_word
    assert upload_bytes(arrays, secure=False) == sum(len(ndarray_to_bytes(a)) for a in arrays)


def test_instructions_round_trip_and_refuse_malformed_label_names():
    sent = FitInstructions(server_round=3, run_id="r1", label_names=("a", "b"), lora_a_sha256="ab")
    assert FitInstructions.from_config(sent.to_config()) == sent
    assert FitInstructions.from_config({"server-round": 1}) == FitInstructions(server_round=1)
    assert EvaluateInstructions.from_config(EvaluateInstructions(server_round=2, label_names=("x",)).to_config()) \
        == EvaluateInstructions(server_round=2, label_names=("x",))
    for bad in ('{"a": 1}', "not json", "[1, 2]"):
        with pytest.raises(FedtuneError, match="label-names") as caught:
            FitInstructions.from_config({"server-round": 1, "label-names": bad})
        assert bad not in str(caught.value)  # an error text never quotes what was sent
    with pytest.raises(FedtuneError, match="server-round"):
        FitInstructions.from_config({"server-round": "2"})


def test_a_fit_report_sends_exactly_its_fields_and_leaves_absent_ones_out():
    report = _report("c", lora_a_sha256=None)
    metrics = report.to_metrics()
    assert set(metrics) <= set(CLEAR_FIT_FIELDS)
    assert "lora_a_sha256" not in metrics and "resent" not in metrics  # Flower metrics have no null
    assert metrics["status"] == "trained" and type(metrics["status"]) is str
    assert FitReport.from_metrics(metrics) == report
    unknown = FitReport.from_metrics({"status": "made-up", "secret": "x"})
    assert unknown.status == "made-up" and unknown.client_id == "?" and not hasattr(unknown, "secret")
    assert EvaluateReport.from_metrics({"client_id": "c", "accuracy": 0.5, "other": 1},
                                       score_names=("accuracy",)).scores == {"accuracy": 0.5}


def test_a_run_made_before_the_layout_change_still_audits_clean():
    """`fedtune audit` on a run the previous layout wrote (the tiny model, 2 clients x 2 rounds,
    DP and SecAgg+): every record verifies and recomputes, with a key pinned as an auditor would."""
    pinned = BEFORE / "ledgers" / "client-0" / "ledger.pub"
    result = run_fedtune("audit", str(BEFORE), "--json", "--public-key", f"client-0={pinned}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    audit = json.loads(result.stdout)
    assert audit["verdict"] == "consistent" and not audit["problems"]
    assert len(audit["rows"]) == 4 and all(not row["flags"] for row in audit["rows"])
    assert max(row["recomputed_epsilon"] for row in audit["rows"]) <= 4.0 * 1.01
    assert [ledger["key_pinned"] for ledger in audit["ledgers"] if ledger["owner"] == "client-0"] == [True]
