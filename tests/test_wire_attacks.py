"""What a hostile coordinator or client can send through the wire contract (common/protocol.py),
and what the other side does with it: refuse before anything is spent, quote nothing it got."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status as FlowerStatus, ndarrays_to_parameters

from fedtune.client.fl_client import FedtuneClient
from fedtune.common.errors import FedtuneError
from fedtune.common.tasks import get_task
from fedtune.server.bookkeeping import round_record, server_ledger_record
from fedtune.server.strategy import AdapterFedAvg
from tests.conftest import initial_adapter

MALFORMED = [
    ({"server-round": "1", "fedtune-run-id": "r"}, "server-round"),
    ({"server-round": 1, "label-names": '"sport"'}, "label-names"),  # a string, read as its characters before
    ({"server-round": 1, "label-names": '{"sport": 0, "markets": 1}'}, "label-names"),
    ({"server-round": 1, "label-names": "[1, 2, 3]"}, "label-names"),
    ({"server-round": 1, "label-names": "not json ssn=123-45-6789"}, "label-names"),
]


@pytest.mark.parametrize("config, key", MALFORMED, ids=[f"{key}-{i}" for i, (_, key) in enumerate(MALFORMED)])
def test_malformed_instructions_are_refused_before_any_spend_and_quoted_nowhere(tiny_config, tmp_path, config, key):
    run = tiny_config(dp=True)
    parameters = initial_adapter(run)
    client = FedtuneClient(config=run, partition_id=0, ledger_dir=tmp_path, run_id="flower-run")
    for call in (client.fit, client.evaluate):
        with pytest.raises(FedtuneError, match=key) as refused:
            call([p.copy() for p in parameters], dict(config))
        sent = str(config[key])
        assert sent not in str(refused.value) and "123-45-6789" not in str(refused.value)
        assert "sport" not in str(refused.value)  # nor the node's own labels
    assert not (tmp_path / "ledger.jsonl").exists()  # refused before the budget guard: nothing signed
    assert not (tmp_path / "sent-updates").exists()  # nothing trained, nothing cached


def test_a_client_cannot_write_into_the_coordinators_records():
    """Metrics a client adds beyond its FitReport (a forged rejection, validation scores it was
    never asked for) reach neither metrics.jsonl nor the coordinator's signed ledger record."""
    task = get_task("classification")
    initial = [np.zeros((2, 2), np.float32)]
    strategy = AdapterFedAvg(initial_arrays=initial, clients_per_round=1, num_clients=1, run_id="r",
                             label_names=["a", "b"], score_names=task.score_names, fraction_evaluate=0.0,
                             secure_aggregation=False, max_update_norm=10.0)
    forged = {"client_id": "c0", "status": "trained", "steps": 1, "epsilon": 0.5, "ledger_head": "h",
              "rejected": "FORGED", "val_accuracy": 1.0, "val_loss": 0.0, "note": "FORGED", "reason": "x" * 100_000}
    reply = FitRes(status=FlowerStatus(code=Code.OK, message=""), parameters=ndarrays_to_parameters(initial),
                   num_examples=10, metrics=forged)
    outcome = strategy.record_replies(1, [(None, reply)], [])
    record = round_record(server_round=1, outcome=outcome, test_scores={}, task=task, seconds=1.0, bytes_up=1,
                          secure_aggregation=False)
    fields = server_ledger_record(run_id="r", record=record, outcome=outcome, adapter_sha256="x", task=task)
    assert record["clients"]["c0"]["epsilon"] == 0.5 and fields["epsilon"] == {"c0": 0.5}
    for written in (record, fields):
        text = json.dumps(written)
        assert "FORGED" not in text and "val_accuracy" not in text and "val_loss" not in text
    assert fields["rejected"] == {}
    assert len(record["clients"]["c0"]["reason"]) == 500  # free text, bounded before it is recorded
