"""A refusal the coordinator records under an institution's name must be one that institution sent:
refusals are read only after `admit` checked the key statements of the same batch, so a node
cannot file one for an institution that proves itself beside it (found by an attacker's review)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtune.client.app import build_client_app
from fedtune.common.ledger.chain import read_records
from fedtune.common.protocol import REFUSAL_VERSION, SecAggWire
from fedtune.simulations.inprocess import federation, metrics, run

FORGED_REASON = "client-1's roster expired; it will not take part in secure aggregation"


@pytest.fixture
def config(tiny_config):
    # every node is sampled in round 1 (deterministic), and three remain above the threshold (3 of 4)
    return tiny_config(num_clients=4, clients_per_round=4, num_rounds=1, dp=False, secure_aggregation=True)


def _signed_secagg_refusals(run_dir, institution: str) -> set[str]:
    path = run_dir / "ledgers" / institution / "ledger.jsonl"
    return {r["reason"] for r in read_records(path) if r["status"] == "refused-secure-aggregation"} \
        if path.is_file() else set()


def test_a_node_cannot_plant_a_setup_refusal_in_another_institutions_name(config, tmp_path):
    """client-0 (node 100) answers setup with a refusal naming client-1; client-1 (node 101) is
    honest and answers setup with its signed keys in the same batch. Nothing client-1 signed says
    it refused, so no record of the coordinator may say so."""
    real = build_client_app(config=config, ledger_root=tmp_path / "run" / "ledgers")

    def hostile(msg: Message, context):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if msg.metadata.dst_node_id == 100 and configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            forged = {"version": REFUSAL_VERSION, "institution": "client-1", "stage": "setup",
                      "reason": FORGED_REASON}
            return Message(RecordDict({SecAggWire.REFUSAL: ConfigRecord(forged)}), reply_to=msg)
        return real(msg, context)

    grid, run_dir = federation(config, tmp_path / "run", client_app=hostile)
    run(grid, config, run_dir)
    [record] = metrics(run_dir.path)
    server = read_records(run_dir.path / "ledgers" / "server" / "ledger.jsonl")[0]
    assert _signed_secagg_refusals(run_dir.path, "client-1") == set()  # client-1 never refused
    for recorded in (record.get("secagg_refusals", {}), server.get("secagg_refusals", {})):
        # every refusal the coordinator records is one the named institution signed in its own ledger
        for institution, reason in recorded.items():
            assert reason in _signed_secagg_refusals(run_dir.path, institution), \
                f"the coordinator records {institution} as refusing ({reason!r}); {institution} signed no such refusal"
