"""Attacks on the execution profile, the resident model host and the pooled-feature cache.

Findings (fail until fixed):
- a resident pooled classifier (probe / two-stage) is keyed without the run seed: a node runtime
  that served one run hands a later run of another seed the first run's model (its LoRA A), so an
  FFA run refuses every round; the same missing seed gives a coordinator's build (head-prior off)
  the first seed's head;
- the feature cache key hashes the base's weight files only: a base whose config.json changes what
  the encoder computes (same weights) still hits the old features.

The rest assert what holds: a deployed node's profile is its own whatever the job says, nothing of
one client's message survives in the resident model for the next client, the DP generators are
fresh, OS-seeded and separate, and nothing a coordinator sends reaches the feature cache's paths.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import stat

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

import fedtune.client.app as client_app
import fedtune.client.trainer as client_trainer
import fedtune.common.models.pooled_features as pf
from fedtune.client.fl_client import FedtuneClient
from fedtune.client.privacy_ledger import ClientPrivacyLedger
from fedtune.common.execution import ExecutionProfile
from fedtune.common.models import host
from fedtune.common.models.adapter import adapter_to_arrays
from fedtune.common.models.loading import load_tokenizer
from fedtune.common.models.lora import LoraSettings, lora_a_sha256
from fedtune.common.models.pooled_classifier import HeadSettings
from fedtune.common.models.pooled_features import FEATURES_DIR
from fedtune.common.privacy.noise import private_generator
from fedtune.common.run_data import federated_splits
from fedtune.common.tasks import get_task, resolve_model_path
from fedtune.common.tasks.classification import encode

FP32 = ExecutionProfile(device="cpu", base_dtype="float32")
HEX_KEY = re.compile(r"^[0-9a-f]{64}\.safetensors$")


@pytest.fixture(autouse=True)
def _fresh_process_state():
    host.forget_all()
    pf.clear_memory()
    yield
    host.forget_all()
    pf.clear_memory()


def _pooled(config, *, seed: int, resident: bool, model_path=None, profile=FP32, label_names=()):
    return get_task("classification").build_model(
        model_path=model_path or resolve_model_path(config.model), num_labels=3,
        lora=LoraSettings.from_config(config), seed=seed, head=HeadSettings.from_config(config, label_names=label_names),
        profile=profile, resident=resident)


def _coordinator_arrays(config):
    """What a coordinator sends in round 1: its own (non-resident) build's adapter, and its A hash."""
    splits = federated_splits(config)
    model = _pooled(config, seed=config.seed, resident=False, label_names=splits.label_names)
    return adapter_to_arrays(model), lora_a_sha256(model)


def _deterministic_dp(monkeypatch):
    """Seeded DP generators (the product draws OS entropy): two runs of a round can be compared."""
    seeds = itertools.count()
    monkeypatch.setattr(client_trainer, "private_generator",
                        lambda **kw: torch.Generator(**kw).manual_seed(1000 + next(seeds)))


# -- finding: the resident pooled build ignores the seed ----------------------------------------


def test_a_resident_pooled_build_for_another_seed_is_that_seeds_build(tiny_config):
    """A node runtime serves run 1 (seed 1) and then run 2 (seed 2), both probe / FFA: run 2's
    resident model must be run 2's build, not run 1's kept model reset to run 1's snapshot."""
    config = tiny_config(training_mode="probe", lora_variant="ffa")
    fresh = lora_a_sha256(_pooled(config, seed=2, resident=False))  # what a fresh process builds for seed 2
    host.forget_all()
    first = _pooled(config, seed=1, resident=True)
    assert lora_a_sha256(first) != fresh  # the two seeds do draw different A's
    second = _pooled(config, seed=2, resident=True)
    assert lora_a_sha256(second) == fresh, "run 2 got run 1's resident model (its seed-1 LoRA A)"


def test_a_node_runtime_that_served_one_run_trains_the_next_run_of_another_seed(tiny_config, tmp_path):
    """The same through the client: two-stage FFA, run 1 with seed 1 then run 2 with seed 2 in one
    process (the node runtime keeps its resident host across runs). Run 2's coordinator sends its
    A hash; the node must build that A and train, not refuse every round of run 2."""
    first = tiny_config(training_mode="two-stage", lora_variant="ffa", probe_rounds=1, num_rounds=2, seed=1,
                        secure_aggregation=False)
    arrays, shared = _coordinator_arrays(first)
    node = FedtuneClient(config=first, partition_id=0, ledger_dir=tmp_path / "run-1", run_id="run-1", profile=FP32)
    _, _, metrics = node.fit([a.copy() for a in arrays], {"server-round": 1, "lora-a-sha256": shared})
    assert metrics["status"] == "trained"

    second = first.with_overrides(seed=2)
    arrays, shared = _coordinator_arrays(second)
    node = FedtuneClient(config=second, partition_id=0, ledger_dir=tmp_path / "run-2", run_id="run-2", profile=FP32)
    _, _, metrics = node.fit([a.copy() for a in arrays], {"server-round": 1, "lora-a-sha256": shared})
    assert metrics["status"] == "trained"


def test_a_coordinators_pooled_build_draws_its_head_from_its_own_seed(tiny_config):
    """Same root cause, coordinator side (head-prior off: the head is drawn from the RNG): the host
    restores the RNG to where the *first* load left it, and the pooled base is keyed without the
    seed, so a seed-2 build after a seed-1 build draws seed 1's head."""
    config = tiny_config(training_mode="probe", head_prior=False)
    head = "base_model.model.classifier.modules_to_save.default.weight"
    fresh = dict(_pooled(config, seed=2, resident=False).named_parameters())[head].detach().clone()
    host.forget_all()
    _pooled(config, seed=1, resident=False)
    again = dict(_pooled(config, seed=2, resident=False).named_parameters())[head].detach()
    assert torch.equal(again, fresh), "a seed-2 build after a seed-1 build is not a fresh seed-2 build"


# -- finding: a base whose config changes still hits the old features ---------------------------


def test_a_base_whose_config_changes_the_encoder_misses_the_feature_cache(tiny_config, tiny_model_dir, tmp_path):
    """Same weight files, another config.json (here the MLP's activation, relu for gelu: the same
    weights, another computation). The features differ, so the cache must miss."""
    config = tiny_config(training_mode="probe")
    folder = shutil.copytree(tiny_model_dir, tmp_path / "base")
    dataset = encode(tokenizer=load_tokenizer(folder), split=federated_splits(config).clients[0].train,
                     max_length=config.max_length)
    cache = tmp_path / "ledger" / FEATURES_DIR
    before = pf.cached_pooled_features(model=_pooled(config, seed=0, resident=True, model_path=folder),
                                       dataset=dataset, cache_dir=cache)
    settings = json.loads((folder / "config.json").read_text())
    assert settings["hidden_act"] == "gelu"
    settings["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(settings))
    pf.clear_memory()  # the next round in another actor, or the node restarted
    model = _pooled(config, seed=0, resident=True, model_path=folder)  # the host reloads: the files changed
    truth = pf.pooled_features(model, dataset).tensors[0]
    assert not torch.allclose(truth, before.tensors[0], atol=1e-4)  # the change does change the features
    cached = pf.cached_pooled_features(model=model, dataset=dataset, cache_dir=cache).tensors[0]
    assert torch.equal(cached, truth), "the feature cache returned the old base's features"


# -- what holds: the job never picks a deployed node's profile ----------------------------------


def test_a_deployed_nodes_client_takes_no_profile_key_from_the_job(tiny_config, tiny_csv, tmp_path, monkeypatch):
    """The installed app's client_fn on a node with its own data: whatever device, dtype, threads and
    physical batch the coordinator's run config names, the client trains on the node config's."""
    built = []
    real = client_app.FedtuneClient

    def capturing(**kwargs):
        built.append(real(**kwargs))
        return built[-1]

    monkeypatch.setattr(client_app, "FedtuneClient", capturing)
    job = tiny_config(device="cpu", base_dtype="bfloat16", threads=7, physical_batch_size=3)
    node_config = {"data": str(tiny_csv), "client-id": "hospital-a", "ledger-dir": str(tmp_path / "ledger"),
                   "base-dtype": "float32", "physical-batch-size": 5}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=job.to_flower())
    client_app.client_fn_of(config=None, ledger_root=None)(context)
    [node] = built
    assert node.job.base_dtype == "bfloat16" and node.job.physical_batch_size == 3  # the job did ask
    assert node.profile == ExecutionProfile(device="auto", base_dtype="float32", threads=0, physical_batch_size=5)


def test_the_profile_never_changes_the_dp_mechanism_of_a_round(tiny_config, tmp_path):
    """A node's physical batch and precision: sigma, q, steps and epsilon signed are the same."""
    config = tiny_config(num_clients=2, clients_per_round=2, secure_aggregation=False, batch_size=32)
    arrays = adapter_to_arrays(get_task("classification").build_model(
        model_path=resolve_model_path(config.model), num_labels=3, lora=LoraSettings.from_config(config),
        seed=config.seed, profile=FP32))
    mechanism = ("noise_multiplier", "sample_rate", "steps", "steps_per_round", "planned_rounds", "epsilon", "delta")
    signed = []
    for name, profile in {"whole": FP32, "pieces": ExecutionProfile(device="cpu", base_dtype="bfloat16",
                                                                      physical_batch_size=3, threads=1)}.items():
        node = FedtuneClient(config=config, partition_id=0, ledger_dir=tmp_path / name, run_id="r", profile=profile)
        _, _, metrics = node.fit([a.copy() for a in arrays], {"server-round": 1})
        assert metrics["status"] == "trained"
        record = ClientPrivacyLedger(directory=tmp_path / name, client_id="client-0").record_for("r", 1)
        signed.append([record[k] for k in mechanism])
        assert record["profile"]["physical-batch-size"] == profile.physical_batch_size
    assert signed[0] == signed[1]


# -- what holds: nothing of one message reaches the next through the resident model -------------


def _opacus_leftovers(model) -> list[str]:
    left = [f"{n}.{a}" for n, p in model.named_parameters()
            for a in ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample") if hasattr(p, a)]
    left += [f"{n}.grad" for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    left += [n for n, m in model.named_modules() if hasattr(m, "autograd_grad_sample_hooks")
             or getattr(m, "activations", None)]
    return left


@pytest.mark.parametrize("mode", ["adapter", "two-stage"])
def test_a_clients_update_is_the_same_whether_another_client_trained_before_it_in_this_process(
        tiny_config, tmp_path, monkeypatch, mode):
    """Two simulated clients in one actor share the resident model and the in-memory features: B's
    update (seeded DP generators) must equal B's update in a process where A never ran."""
    config = tiny_config(training_mode=mode, probe_rounds=1, num_rounds=2, secure_aggregation=False,
                         lora_variant="lora")
    splits = federated_splits(config)
    if mode == "adapter":
        arrays = adapter_to_arrays(get_task("classification").build_model(
            model_path=resolve_model_path(config.model), num_labels=3, lora=LoraSettings.from_config(config),
            seed=config.seed, profile=FP32))
    else:
        arrays = adapter_to_arrays(_pooled(config, seed=config.seed, resident=False, label_names=splits.label_names))
    host.forget_all()

    def fit(partition: int, folder: str, server_round: int = 1):
        _deterministic_dp(monkeypatch)
        node = FedtuneClient(config=config, partition_id=partition, ledger_dir=tmp_path / folder / str(partition),
                             run_id="r", profile=FP32)
        update, _, metrics = node.fit([a.copy() for a in arrays], {"server-round": server_round})
        assert metrics["status"] == "trained"
        return update

    fit(0, "shared")  # client A, then client B in the same process
    resident = [b.model for b in host._built.values()]
    assert resident and all(not _opacus_leftovers(m) for m in resident)
    after_a = fit(1, "shared")
    host.forget_all()
    pf.clear_memory()
    alone = fit(1, "alone")  # client B in a process of its own
    for x, y in zip(after_a, alone, strict=True):
        np.testing.assert_array_equal(x, y)


def test_every_trainable_is_fp32_on_a_bf16_node_in_probe_and_adapter_rounds(tiny_config, tmp_path, monkeypatch):
    """Two-stage on a bf16 base: the probe round's head copy and the adapter round's LoRA and head
    are fp32 when the step runs (the trainer's own check, spied on), and the rounds train."""
    bf16 = ExecutionProfile(device="cpu", base_dtype="bfloat16")
    config = tiny_config(training_mode="two-stage", probe_rounds=1, num_rounds=2, secure_aggregation=False)
    splits = federated_splits(config)
    arrays = adapter_to_arrays(_pooled(config, seed=config.seed, resident=False, label_names=splits.label_names,
                                       profile=bf16))
    seen = []
    real = client_trainer.check_trainables_fp32

    def spy(model):
        seen.append({str(p.dtype) for p in model.parameters() if p.requires_grad})
        real(model)

    monkeypatch.setattr(client_trainer, "check_trainables_fp32", spy)
    node = FedtuneClient(config=config, partition_id=0, ledger_dir=tmp_path, run_id="r", profile=bf16)
    for server_round in (1, 2):
        _, _, metrics = node.fit([a.copy() for a in arrays], {"server-round": server_round})
        assert metrics["status"] == "trained"
    assert seen == [{"torch.float32"}, {"torch.float32"}]
    [model] = [b.model for b in host._built.values()]
    frozen = {str(p.dtype) for n, p in model.named_parameters() if "encoder" in n and ".lora_" not in n}
    assert frozen == {"torch.bfloat16"}  # the base really is bf16
    record = ClientPrivacyLedger(directory=tmp_path, client_id="client-0").record_for("r", 2)
    assert record["profile"]["base-dtype"] == "bfloat16"


# -- what holds: the DP generators --------------------------------------------------------------


def test_the_sampler_and_the_noise_get_two_fresh_os_seeded_generators_never_the_run_seed(tiny_config, monkeypatch):
    made = []

    def recording(**kwargs):
        generator = private_generator(**kwargs)
        made.append((kwargs.get("device", "cpu"), generator.initial_seed()))
        return generator

    monkeypatch.setattr(client_trainer, "private_generator", recording)
    config = tiny_config(num_clients=2, clients_per_round=2, secure_aggregation=False)
    from fedtune.client.trainer import train_locally
    from fedtune.common.privacy.plan import plan_privacy

    model = get_task("classification").build_model(model_path=resolve_model_path(config.model), num_labels=3,
                                                   lora=LoraSettings.from_config(config), seed=config.seed,
                                                   profile=FP32)
    dataset = encode(tokenizer=load_tokenizer(resolve_model_path(config.model)),
                     split=federated_splits(config).clients[0].train, max_length=config.max_length)
    plan = plan_privacy(num_examples=len(dataset), batch_size=32, local_epochs=1, num_rounds=2, target_epsilon=8.0,
                        target_delta=1e-5)
    for _ in range(2):
        train_locally(model=model, dataset=dataset, loss=get_task("classification").loss, learning_rate=0.1,
                      batch_size=32, local_epochs=1, max_grad_norm=1.0, plan=plan, history=[], seed=config.seed)
    assert len(made) == 4  # a sampler's and a noise generator per round
    seeds = [s for _, s in made]
    assert len(set(seeds)) == 4, "two generators (or two rounds) share a seed"
    run_seeds = {config.seed, config.seed * 1_000_003 + 1, config.seed * 1_000_003 + 2}
    assert not set(seeds) & run_seeds
    assert [str(d) for d, _ in made] == ["cpu", "cpu", "cpu", "cpu"]  # this CPU model: both on the CPU


# -- what holds: the feature cache's paths and modes --------------------------------------------


def test_a_hostile_run_id_and_round_never_reach_the_feature_cache_paths(tiny_config, tmp_path):
    """The coordinator names the run id and the round; the features land under the node's own
    ledger dir, named by a sha256, owner-only, and nowhere else."""
    config = tiny_config(training_mode="probe", num_rounds=2, secure_aggregation=False)
    arrays, _ = _coordinator_arrays(config)
    ledger = tmp_path / "node" / "ledger"
    node = FedtuneClient(config=config, partition_id=0, ledger_dir=ledger, run_id="flower-run")
    hostile = "../../../escaped/" + "x" * 10
    _, _, metrics = node.fit([a.copy() for a in arrays], {"server-round": 1, "fedtune-run-id": hostile})
    assert metrics["status"] == "trained"
    files = [p for p in tmp_path.rglob("*.safetensors")]
    assert files and all(p.parent == ledger / FEATURES_DIR and HEX_KEY.match(p.name) for p in files), files
    assert not (tmp_path / "escaped").exists()
    assert stat.S_IMODE((ledger / FEATURES_DIR).stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
