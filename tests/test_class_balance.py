"""Issue 33: a run says how its predictions spread over the classes, so a model that predicts one
class is never mistaken for one that learned (the coordinator's own test split; nodes send none of it)."""

from __future__ import annotations

import io

import torch
from rich.console import Console


def test_the_scores_count_how_the_predictions_spread():
    from fedtune.common.tasks.classification import scores_of_logits

    one_class = scores_of_logits(torch.tensor([[2.0, 0.0, 0.0]] * 4), torch.tensor([0, 0, 1, 2]))
    assert one_class["largest_class_share"] == 1.0 and one_class["predicted_classes"] == 1
    assert one_class["accuracy"] == 0.5 and abs(one_class["macro_f1"] - (2 / 3) / 3) < 1e-9  # F1 2/3 for class 0 only
    spread = scores_of_logits(torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 0]))
    assert spread["largest_class_share"] == 0.5 and spread["predicted_classes"] == 3


def test_the_round_table_shows_the_top_class_share_and_warns_of_a_single_class(tiny_config):
    from fedtune.server.round_table import RoundTable

    record = {"round": 1, "clients_trained": 2, "clients_sampled": 2, "seconds": 1.0, "update_applied": True,
              "test_accuracy": 0.65, "test_macro_f1": 0.263, "test_largest_class_share": 1.0,
              "test_predicted_classes": 1,
              "clients": {f"client-{i}": {"status": "trained", "epsilon": 1.5, "num_examples": 9} for i in range(2)}}
    buffer = io.StringIO()
    table = RoundTable.for_run(tiny_config(dp=True), Console(file=buffer, width=200))
    table.add(record)
    table.add({**record, "round": 2, "test_largest_class_share": 0.62, "test_predicted_classes": 3})
    header, first, warning, second = buffer.getvalue().splitlines()
    assert header.split()[6:9] == ["macro-F1", "top", "class"] and first.split()[3:6] == ["0.650", "0.263", "1.00"]
    assert "round 1: the model predicts a single class for every test example" in warning
    assert second.split()[5] == "0.62" and "single class" not in second
