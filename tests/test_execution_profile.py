"""The execution profile: a bf16 base trains under DP like an fp32 one, everything that trains is
fp32, the privacy plan ignores the profile, and the resident host loads the base once."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

import fedtune.client.trainer as client_trainer
from fedtune.client.app import profile_of
from fedtune.client.fl_client import FedtuneClient
from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.client.trainer import train_locally
from fedtune.common.errors import FedtuneError
from fedtune.common.execution import ExecutionProfile, check_trainables_fp32
from fedtune.common.models import host
from fedtune.common.models.adapter import adapter_to_arrays, arrays_to_adapter, trainable_named_parameters
from fedtune.common.models.classifier import build_lora_classifier
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings, lora_a_sha256
from fedtune.common.models.pooled_classifier import HeadSettings
from fedtune.common.privacy.plan import plan_privacy
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks import get_task, resolve_model_path
from fedtune.common.tasks.classification import encode, evaluate_classifier
from tests.conftest import initial_adapter

FP32, BF16 = ExecutionProfile(device="cpu", base_dtype="float32"), ExecutionProfile(device="cpu", base_dtype="bfloat16")


def _build(config, profile, **kwargs):
    return build_lora_classifier(model_path=resolve_model_path(config.model), num_labels=3,
                                 lora=LoraSettings.from_config(config), seed=config.seed, profile=profile, **kwargs)


def _data(config, part: str = "train"):
    splits = federated_splits(config)
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    split = splits.clients[0].train if part == "train" else splits.test
    return encode(tokenizer=tokenizer, split=split, max_length=config.max_length)


def test_a_bf16_base_keeps_every_trainable_in_fp32_and_the_step_checks_it(tiny_config):
    config = tiny_config(lora_variant="ffa")
    fp32, bf16 = _build(config, FP32), _build(config, BF16)
    frozen = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    assert dict(fp32.named_parameters())[frozen].dtype == torch.float32
    assert dict(bf16.named_parameters())[frozen].dtype == torch.bfloat16
    for model in (fp32, bf16):
        assert {p.dtype for _, p in trainable_named_parameters(model)} == {torch.float32}
        check_trainables_fp32(model)
    # FFA-LoRA's frozen A is drawn in fp32 from the seed: one A on nodes of either precision.
    assert lora_a_sha256(fp32) == lora_a_sha256(bf16)
    name, param = trainable_named_parameters(bf16)[0]
    param.data = param.data.bfloat16()
    with pytest.raises(RuntimeError, match="not fp32"):
        train_locally(model=bf16, dataset=_data(config), loss=get_task("classification").loss, learning_rate=0.1,
                      batch_size=16, local_epochs=1, max_grad_norm=1.0, plan=None, history=[], seed=0)


def test_per_sample_gradients_with_a_bf16_base_agree_with_fp32(tiny_config):
    """Same adapter values on an fp32 and a bf16 base: each example's gradient (what DP-SGD clips)
    has a norm within 15% and a median within 5% of fp32's (measured here: median 2.9%, largest
    6.6%; bf16 keeps 8 bits of mantissa in the base's matmuls) and points nearly the same way.
    The tiny 32-wide model is bf16's worst case: rounding matters more the narrower a layer is."""
    config = tiny_config(lora_variant="lora")
    fp32, bf16 = _build(config, FP32), _build(config, BF16)
    generator = torch.Generator().manual_seed(0)
    arrays = [torch.randn(a.shape, generator=generator).numpy() * 0.1 for a in adapter_to_arrays(fp32)]
    input_ids, attention_mask, labels = _data(config)[:32]
    grads = []
    for model in (fp32, bf16):
        arrays_to_adapter(model, arrays)
        model.train()
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        get_task("classification").loss(wrapped, input_ids, attention_mask, labels).backward()
        per_sample = [p.grad_sample.reshape(len(labels), -1) for _, p in trainable_named_parameters(model)]
        assert all(g.dtype == torch.float32 for g in per_sample)
        grads.append(torch.cat(per_sample, dim=1))
        wrapped.cleanup()
    norms = [g.norm(dim=1) for g in grads]
    relative = ((norms[1] - norms[0]).abs() / norms[0]).numpy()
    assert np.median(relative) < 0.05 and relative.max() < 0.15, relative
    cosines = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1)  # measured: 0.88 to 0.99
    assert cosines.median() > 0.9 and cosines.min() > 0.8, cosines


def test_a_bf16_base_trains_under_dp_and_learns_as_fp32_does(tiny_config, monkeypatch):
    """Ten DP-SGD rounds under the same (seeded) noise on either base: both learn, and end within
    a few hundredths of each other (measured: accuracy 0.517 both, loss 0.9142 against 0.9148)."""
    config = tiny_config(num_clients=1, clients_per_round=1, secure_aggregation=False, lora_variant="ffa")
    train, test = _data(config), _data(config, "test")
    plan = plan_privacy(num_examples=len(train), batch_size=32, local_epochs=1, num_rounds=10, target_epsilon=8.0,
                        target_delta=1e-5)
    scores = {}
    for profile in (FP32, BF16):
        seeds = itertools.count()  # seeded noise, the same for both; OS entropy in the product
        monkeypatch.setattr(client_trainer, "private_generator",
                            lambda _seeds=seeds, **kw: torch.Generator(**kw).manual_seed(next(_seeds)))
        model = _build(config, profile)
        before, history = evaluate_classifier(model=model, dataset=test), []
        for round_seed in range(10):
            history = train_locally(model=model, dataset=train, loss=get_task("classification").loss,
                                    learning_rate=0.2, batch_size=32, local_epochs=1, max_grad_norm=1.0, plan=plan,
                                    history=history, seed=round_seed).history
        after = scores[profile.base_dtype] = evaluate_classifier(model=model, dataset=test)
        assert after["accuracy"] >= before["accuracy"] + 0.1 and after["loss"] < before["loss"] - 0.1, (before, after)
    assert abs(scores["bfloat16"]["accuracy"] - scores["float32"]["accuracy"]) <= 0.05, scores
    assert abs(scores["bfloat16"]["loss"] - scores["float32"]["loss"]) <= 0.02, scores


def test_the_profile_never_changes_the_privacy_plan_and_the_ledger_names_it(tiny_config, tmp_path):
    config = tiny_config(num_clients=2, clients_per_round=2, secure_aggregation=False)
    parameters = initial_adapter(config)
    records = {}
    for profile in (FP32, BF16):
        directory = tmp_path / profile.base_dtype
        client = FedtuneClient(config=config, partition_id=0, ledger_dir=directory, run_id="run-1", profile=profile)
        _, _, metrics = client.fit([p.copy() for p in parameters], {"server-round": 1})
        assert metrics["status"] == "trained"
        records[profile.base_dtype] = ClientPrivacyLedger(directory=directory, client_id="client-0").record_for("run-1", 1)
    mechanism = ("noise_multiplier", "sample_rate", "steps", "steps_per_round", "planned_rounds", "epsilon", "delta")
    assert [records["float32"][k] for k in mechanism] == [records["bfloat16"][k] for k in mechanism]
    assert records["float32"]["profile"]["base-dtype"] == "float32"
    assert records["bfloat16"]["profile"]["base-dtype"] == "bfloat16"
    assert records["bfloat16"]["profile"]["device"] == "cpu"


def test_the_host_loads_the_base_once_and_every_build_equals_a_fresh_one(tiny_config):
    config = tiny_config(training_mode="probe")
    task, path = get_task("classification"), resolve_model_path(config.model)

    def build(**kwargs):
        return task.build_model(model_path=path, num_labels=3, lora=LoraSettings.from_config(config), seed=3,
                                head=HeadSettings.from_config(config), profile=BF16, **kwargs)

    def state(model):
        return {name: tensor.clone() for name, tensor in model.state_dict().items()}

    host.forget_all()
    loads, builds = host.base_loads, host.builds
    first = build(resident=True)
    fresh = state(first)
    with torch.no_grad():  # a message trains the resident model...
        for _, param in trainable_named_parameters(first):
            param.add_(1.0)
    again = build(resident=True)  # ...and the next one finds it reset, not rebuilt
    assert again is first and host.builds == builds + 1
    assert all(torch.equal(fresh[name], tensor) for name, tensor in state(again).items())
    coordinator = build()  # a model of its own over the same frozen tensors
    assert coordinator is not first and host.builds == builds + 2
    frozen = next(name for name in fresh if "base_layer.weight" in name)
    assert coordinator.state_dict()[frozen].data_ptr() == first.state_dict()[frozen].data_ptr()
    assert host.base_loads == loads + 1  # three builds, one read of the disk
    host.forget_all()
    assert all(torch.equal(fresh[name], tensor) for name, tensor in state(build()).items())  # bit for bit
    assert host.base_loads == loads + 2


def test_a_deployed_node_trains_on_its_own_profile_whatever_the_job_says(tiny_config):
    """Hardware is the institution's: a job asking for another device, precision, thread count or
    batch size cannot change what a deployed node (config None: Flower's run config is only a
    request) uses; in a simulation the run's profile holds unless a node config overrides it."""
    node_config = {"data": "/srv/records.csv", "client-id": "hospital-a", "base-dtype": "float32", "threads": "1"}
    deployed = profile_of(SimpleNamespace(node_config=node_config, run_config={"device": "cuda"}), None)
    assert deployed == ExecutionProfile(device="auto", base_dtype="float32", threads=1, physical_batch_size=0)
    job = tiny_config(device="cpu", base_dtype="bfloat16", physical_batch_size=4)
    simulated = profile_of(SimpleNamespace(node_config={"partition-id": 0}), job)
    assert simulated == ExecutionProfile(device="cpu", base_dtype="bfloat16", threads=0, physical_batch_size=4)
    with pytest.raises(FedtuneError, match="base-dtype"):
        profile_of(SimpleNamespace(node_config={"base-dtype": "float8"}), job)


@pytest.mark.parametrize("key,value,expected", [("device", "tpu", "device must be"),
                                                ("base_dtype", "fp16", "base-dtype must be"),
                                                ("threads", -1, "threads")])
def test_a_bad_profile_key_is_a_clear_error(tiny_config, key, value, expected):
    with pytest.raises(FedtuneError, match=expected):
        tiny_config(**{key: value})


def test_asking_for_a_gpu_where_there_is_none_says_what_to_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU node, whatever runs the test
    with pytest.raises(FedtuneError, match='device = "cpu"'):
        ExecutionProfile(device="cuda").torch_device()
    assert ExecutionProfile(device="auto").torch_device() == torch.device("cpu")
