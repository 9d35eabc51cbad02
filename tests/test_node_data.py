"""A deployed institution reads its own file, with the federation's label order."""

from __future__ import annotations

import pytest

from fedtune.client.node_data import NodeData, client_split, label_names_from
from fedtune.common.errors import FedtuneError
from fedtune.common.protocol import FitInstructions
from tests.conftest import write_csv


def test_a_node_file_is_indexed_by_the_federations_labels_not_its_own(tiny_config, tmp_path):
    # This site has no 'markets' rows: its own sorted labels would be [politics, sport].
    rows = [(f"text {i} about sport", "sport") for i in range(20)] + [(f"vote {i}", "politics") for i in range(10)]
    path = write_csv(tmp_path / "site.csv", rows, header=("note", "topic"))
    node = NodeData.from_node_config({"client-id": "site-a", "data": str(path), "text-column": "note",
                                      "label-column": "topic", "ledger-dir": str(tmp_path)})
    labels = label_names_from(FitInstructions.from_config({"label-names": '["markets", "politics", "sport"]'}),
                              tiny_config(), node)
    # The node's validation share is its own: the coordinator's validation-fraction changes nothing.
    split = client_split(tiny_config(validation_fraction=0.5), node, labels)
    assert len(split.train) == 27 and len(split.validation) == 3
    texts = split.train.texts + split.validation.texts
    names = [labels[i] for i in split.train.labels + split.validation.labels]
    assert all(("sport" in t) == (n == "sport") for t, n in zip(texts, names))
    assert set(names) == {"sport", "politics"}


def test_a_label_the_federation_does_not_know_is_refused(tiny_config, tmp_path):
    path = write_csv(tmp_path / "site.csv", [("a", "sport"), ("b", "weather")])
    node = NodeData(client_id="x", path=str(path))
    with pytest.raises(FedtuneError, match=r"1 label value\(s\) outside the federation's 1 label names") as refused:
        client_split(tiny_config(), node, ("sport",))
    assert "weather" not in str(refused.value)  # the text reaches the coordinator: counts, never values


@pytest.mark.parametrize("node, message", [
    ({"client-id": "a", "ledger-dir": "/l"}, "node config needs 'data'"),
    ({"data": "/x.csv", "ledger-dir": "/l"}, "node config needs 'client-id'"),
    ({"client-id": "a", "data": "/x.csv", "target_epsilon": 1.0}, "Did you mean 'target-epsilon'"),
])
def test_node_config_mistakes_say_what_to_fix(node, message):
    with pytest.raises(FedtuneError, match=message):
        NodeData.from_node_config(node)


@pytest.mark.parametrize("node, key", [
    ({"target-epsilon": "ssn-123-45-6789"}, "target-epsilon"),
    ({"dp": "ssn-123-45-6789"}, "dp"),
    ({"max-evaluations": 1.5}, "max-evaluations"),
])
def test_a_bad_node_policy_value_names_the_key_and_never_repeats_the_value(node, key):
    """A ClientApp's error text reaches the coordinator: it may name the key, not echo the value."""
    from fedtune.common.privacy.policy import NodePolicy

    with pytest.raises(FedtuneError, match=f"node config key '{key}' must be") as refused:
        NodePolicy.from_node_config(node)
    assert "ssn" not in str(refused.value) and "1.5" not in str(refused.value)


def test_node_data_numbers_are_checked_against_their_range():
    base = {"client-id": "a", "data": "/x.csv"}
    for key, value in (("validation-fraction", 1.0), ("max-length", 0), ("split-seed", "seven")):
        with pytest.raises(FedtuneError, match=f"node config key '{key}' must"):
            NodeData.from_node_config({**base, key: value})
    node = NodeData.from_node_config({**base, "validation-fraction": 0.25, "max-length": 64, "split-seed": 3})
    assert (node.validation_fraction, node.max_length, node.split_seed) == (0.25, 64, 3)
