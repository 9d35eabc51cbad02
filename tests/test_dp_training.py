"""DP-SGD through Opacus on a PEFT model really trains, with noise private to each client."""

import numpy as np
import pytest

from fedtune.client.fl_client import FedtuneClient
from fedtune.client.trainer import train_locally
from fedtune.common.tasks.classification import evaluate_classifier
from fedtune.common.models.adapter import adapter_to_arrays, trainable_named_parameters
from fedtune.common.models.classifier import build_lora_classifier
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings
from fedtune.common.tasks import resolve_model_path
from fedtune.common.privacy.plan import plan_privacy
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks.classification import encode
from fedtune.common.tasks import get_task
from tests.conftest import initial_adapter



def test_dp_training_changes_every_adapter_tensor_and_improves_accuracy(tiny_config):
    config = tiny_config(num_clients=1, clients_per_round=1, secure_aggregation=False)
    splits = federated_splits(config)
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    model = build_lora_classifier(model_path=path, num_labels=3, lora=LoraSettings(rank=4, alpha=16), seed=0)
    train = encode(tokenizer=tokenizer, split=splits.clients[0].train, max_length=24)
    test = encode(tokenizer=tokenizer, split=splits.test, max_length=24)
    before_arrays = adapter_to_arrays(model)
    before = evaluate_classifier(model=model, dataset=test)
    plan = plan_privacy(num_examples=len(train), batch_size=32, local_epochs=1, num_rounds=10,
                        target_epsilon=8.0, target_delta=1e-5)
    history = []
    for round_seed in range(10):
        result = train_locally(model=model, dataset=train, loss=get_task("classification").loss, learning_rate=0.05, batch_size=32, local_epochs=1,
                               max_grad_norm=1.0, plan=plan, history=history, seed=round_seed)
        history = result.history
        assert result.steps == plan.steps_per_round
    after = evaluate_classifier(model=model, dataset=test)
    names = [name for name, _ in trainable_named_parameters(model)]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("classifier" in n for n in names)
    for name, old, new in zip(names, before_arrays, adapter_to_arrays(model)):
        assert not np.allclose(old, new), f"{name} did not change under DP-SGD"
    assert before["accuracy"] < 0.5  # chance level for 3 labels is 1/3
    assert after["accuracy"] >= before["accuracy"] + 0.25, (before, after)
    assert after["loss"] < before["loss"]


def _update(config, parameters, ledger_dir):
    client = FedtuneClient(config=config, partition_id=0, ledger_dir=ledger_dir, run_id="run-1")
    update, _, metrics = client.fit([p.copy() for p in parameters], {"server-round": 1})
    assert metrics["status"] == "trained"
    return update


@pytest.mark.parametrize("dp", [True, False])
def test_identical_clients_send_independent_noise_only_under_dp(tiny_config, dp, tmp_path):
    config = tiny_config(dp=dp)
    parameters = initial_adapter(config)
    first = _update(config, parameters, tmp_path / "a")
    second = _update(config, parameters, tmp_path / "b")
    largest_gap = max(float(np.abs(a - b).max()) for a, b in zip(first, second))
    if dp:
        assert largest_gap > 1e-4, "two clients drew the same DP noise and batches"
    else:
        assert largest_gap == 0.0, "without DP the same data and adapter must give the same update"
