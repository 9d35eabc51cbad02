"""Pooled features computed once per node: a file any process of the node reads back, missed
whenever anything the vectors depend on changes (data, LoRA, precision, base), owner-only, a corrupt
file recomputed; and the coordinator's test scores on cached features equal the whole model's."""

from __future__ import annotations

import copy
import logging
import shutil
import stat

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

import fedtune.common.models.pooled_features as pf
from fedtune.client.probe_round import train_probe_round
from fedtune.common.models.adapter import adapter_to_arrays
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings
from fedtune.common.models.pooled_classifier import HeadSettings, head_linear
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks import get_task
from fedtune.common.tasks.classification import encode
from fedtune.server.federation import TestSetEvaluator as Evaluator  # (not a pytest class)


@pytest.fixture(autouse=True)
def _fresh_memory():
    pf.clear_memory()
    yield
    pf.clear_memory()


@pytest.fixture
def computations(monkeypatch) -> list[int]:
    """One entry per record set the encoder actually ran over."""
    calls, compute = [], pf.pooled_features

    def counting(model, dataset, **kwargs):
        calls.append(len(dataset))
        return compute(model, dataset, **kwargs)

    monkeypatch.setattr(pf, "pooled_features", counting)
    return calls


@pytest.fixture(scope="module")
def dataset(tiny_config, tiny_model_dir) -> TensorDataset:
    config = tiny_config()
    split = federated_splits(config).clients[0].train
    return encode(tokenizer=load_tokenizer(tiny_model_dir), split=split, max_length=config.max_length)


def _model(tiny_model_dir, *, mode: str = "probe"):
    return get_task("classification").build_model(model_path=tiny_model_dir, num_labels=3, lora=LoraSettings(rank=4),
                                                  seed=0, head=HeadSettings(mode=mode, pooling="mean"))


def _with_base_dtype(model, dtype: torch.dtype):
    """A copy whose frozen base is in `dtype` (LoRA and head as they were). New tensors, never a
    cast in place: builds in one process may share the frozen base's tensors."""
    copied = copy.deepcopy(model)
    for name, module in copied.get_base_model().encoder.named_modules():
        for key, p in list(module._parameters.items()):
            if p is not None and ".lora_" not in f"{name}.{key}":
                module._parameters[key] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return copied


def _files(folder):
    return sorted(folder.glob("*.safetensors"))


def test_a_feature_file_is_read_back_by_a_fresh_process_state(tiny_model_dir, dataset, computations, tmp_path,
                                                               caplog):
    model, folder = _model(tiny_model_dir), tmp_path / "features"
    caplog.set_level(logging.INFO, logger="fedtune.models")
    first = pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=folder)
    assert computations == [len(dataset)] and "computed pooled features" in caplog.text
    assert pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=folder) is first  # memory
    pf.clear_memory()  # another actor or a restarted node: nothing in memory, the file is there
    again = pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=folder)
    assert computations == [len(dataset)] and "read pooled features" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.tensors, again.tensors, strict=True))
    assert again.tensors[0].dtype == torch.float32 and again.tensors[0].shape == (len(dataset), 32)
    [path] = _files(folder)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert path.stem == pf.feature_key(model=model, dataset=dataset)


def test_a_changed_record_a_changed_lora_or_another_precision_is_another_file(tiny_model_dir, dataset,
                                                                               computations, tmp_path):
    model, folder = _model(tiny_model_dir), tmp_path / "features"
    base = pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=folder)
    ids = dataset.tensors[0].clone()
    ids[0, 1] = ids[0, 1] + 1  # one token of one record
    pf.cached_pooled_features(model=model, dataset=TensorDataset(ids, *dataset.tensors[1:]), cache_dir=folder)
    adapted = copy.deepcopy(model)
    with torch.no_grad():
        next(p for name, p in adapted.named_parameters() if ".lora_B" in name).add_(0.5)
    changed = pf.cached_pooled_features(model=adapted, dataset=dataset, cache_dir=folder)
    assert not torch.equal(changed.tensors[0], base.tensors[0])
    fp32, bf16 = _with_base_dtype(model, torch.float32), _with_base_dtype(model, torch.bfloat16)
    high = pf.cached_pooled_features(model=fp32, dataset=dataset, cache_dir=folder)
    low = pf.cached_pooled_features(model=bf16, dataset=dataset, cache_dir=folder)
    assert low.tensors[0].dtype == high.tensors[0].dtype == torch.float32  # stored fp32 whatever computed them
    assert torch.allclose(low.tensors[0], high.tensors[0], atol=0.05)
    assert not torch.equal(low.tensors[0], high.tensors[0])
    # the build's own base dtype (fp32, or bf16 under a bf16 execution profile) is one of the two: that
    # copy has the build's key and hits its features; the other precision is a fourth file
    assert base in (high, low) and len(computations) == 4 and len(_files(folder)) == 4
    pf.clear_memory()
    for same in (adapted, fp32, bf16):  # each read back from its own file
        pf.cached_pooled_features(model=same, dataset=dataset, cache_dir=folder)
    assert len(computations) == 4


def test_a_changed_base_folder_is_another_key(tiny_model_dir, dataset, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "base")
    model = _model(tiny_model_dir)
    model.get_base_model().encoder.config._name_or_path = str(folder)
    before = pf.feature_key(model=model, dataset=dataset)
    assert pf.feature_key(model=model, dataset=dataset) == before
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert pf.feature_key(model=model, dataset=dataset) != before


@pytest.mark.parametrize("damage", ["truncated", "wrong shape"])
def test_an_unreadable_file_is_computed_again_and_rewritten(tiny_model_dir, dataset, computations, tmp_path,
                                                            caplog, damage):
    model, folder = _model(tiny_model_dir), tmp_path / "features"
    good = pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=folder)
    [path] = _files(folder)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        save_file({"features": torch.zeros((len(dataset), 7)), "labels": dataset.tensors[2]}, str(path))
    pf.clear_memory()
    again = pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=folder)
    assert len(computations) == 2 and "unreadable" in caplog.text
    assert torch.equal(again.tensors[0], good.tensors[0]) and stat.S_IMODE(path.stat().st_mode) == 0o600
    pf.clear_memory()
    pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=folder)
    assert len(computations) == 2  # the rewritten file is good


def test_a_probe_round_trains_on_the_nodes_cached_features(tiny_model_dir, dataset, computations, tmp_path):
    model, folder = _model(tiny_model_dir), tmp_path / "features"
    for seed in (1, 2):
        pf.clear_memory()  # each round in another actor
        train_probe_round(model=model, dataset=dataset, learning_rate=0.5, steps=2, max_grad_norm=1.0, plan=None,
                          history=[], seed=seed, cache_dir=folder)
    assert computations == [len(dataset)] and len(_files(folder)) == 1


@pytest.mark.parametrize("mode", ["probe", "two-stage"])
def test_the_coordinators_scores_on_cached_features_are_the_whole_models(tiny_model_dir, dataset, computations,
                                                                        tmp_path, mode):
    task, model = get_task("classification"), _model(tiny_model_dir, mode=mode)
    tester = Evaluator(task=task, model=model, dataset=dataset, features_dir=tmp_path / "features")
    generator = torch.Generator().manual_seed(0)
    for server_round in (1, 2, 3):
        arrays = [a + 0.3 * torch.randn(a.shape, generator=generator).numpy() for a in adapter_to_arrays(model)]
        loss, metrics = tester(server_round, arrays)
        expected = task.evaluate(model=model, dataset=dataset)
        assert loss == pytest.approx(expected["loss"], abs=1e-5)
        assert metrics == pytest.approx({k: v for k, v in expected.items() if k != "loss"}, abs=1e-5)
    # probe: the encoder ran over the test split once; two-stage: its LoRA changed every round
    assert len(computations) == (1 if mode == "probe" else 3)
    # on disk only while the encoder is the base's: the probe's one file; no file per adapter round
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == (1 if mode == "probe" else 0)
    assert head_linear(model).weight.dtype == torch.float32


def test_a_training_mode_adapter_is_scored_by_the_task(tiny_model_dir, dataset, computations, tmp_path):
    task, model = get_task("classification"), _model(tiny_model_dir, mode="adapter")
    tester = Evaluator(task=task, model=model, dataset=dataset, features_dir=tmp_path / "features")
    loss, _ = tester(1, adapter_to_arrays(model))
    assert loss == pytest.approx(task.evaluate(model=model, dataset=dataset)["loss"], abs=1e-6)
    assert computations == [] and not (tmp_path / "features").exists()
