import re
import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig
from common.errors import FedtuneError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_matches_the_typed_defaults():
    document = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert document["tool"]["flwr"]["app"]["config"] == RunConfig().to_flower()


def test_defaults_are_the_embedded_demo():
    cfg = RunConfig()
    assert (cfg.model, cfg.data, cfg.num_clients, cfg.clients_per_round, cfg.num_rounds) == (
        "default", "default", 5, 5, 3)
    assert (cfg.batch_size, cfg.max_length, cfg.lora_rank, cfg.target_epsilon, cfg.target_delta) == (
        64, 128, 8, 8.0, 1e-5)
    # Tuned on the validation split (BENCHMARKS.md): FFA-LoRA with larger steps.
    assert (cfg.lora_variant, cfg.learning_rate, cfg.head_learning_rate) == ("ffa", 5e-2, 1e-1)
    assert cfg.dp and cfg.secure_aggregation and cfg.seed == 0


def test_file_then_set_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('num-rounds = 7\nlora-rank = 4\npartitioner = "dirichlet"\n')
    cfg = RunConfig.load(path=path, overrides=["num-rounds=2", "dp=false", "target-epsilon=3.5"])
    assert cfg.num_rounds == 2 and cfg.lora_rank == 4 and cfg.partitioner == "dirichlet"
    assert cfg.dp is False and cfg.target_epsilon == 3.5


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = RunConfig.load(overrides=["data=/tmp/x \"quoted\".csv", "learning-rate=0.01"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.load(path=path) == cfg


def test_pyproject_itself_is_a_valid_config_file():
    assert RunConfig.load(path=ROOT / "pyproject.toml") == RunConfig()


@pytest.mark.parametrize("override, message", [
    ("lora-rnak=4", "unknown config key 'lora-rnak'. Did you mean 'lora-rank'?"),
    ("target-epsilon=abc", "'target-epsilon' must be a number"),
    ("target-epsilon=-1", "'target-epsilon' must be a positive number"),
    ("target-epsilon=nan", "'target-epsilon' must be a number"),
    ("num-clients=2.5", "'num-clients' must be a whole number"),
    ("dp=maybe", "'dp' must be true or false"),
    ("clients-per-round=9", "cannot exceed num-clients"),
    ("partitioner=shards", "'partitioner' must be one of iid, dirichlet"),
    ("target-delta=1", "'target-delta' must lie strictly between 0 and 1"),
    ("num-rounds", "--set expects key=value"),
    ("secagg-clipping-range=inf", "'secagg-clipping-range' must be 0 (auto) or a positive number"),
])
def test_bad_values_name_the_key_to_fix(override, message):
    with pytest.raises(FedtuneError, match=re.escape(message)):
        RunConfig.load(overrides=[override])


def test_secure_aggregation_needs_two_clients_per_round():
    with pytest.raises(FedtuneError, match="at least 2 with secure-aggregation"):
        RunConfig.load(overrides=["num-clients=1", "clients-per-round=1"])
    assert RunConfig.load(overrides=["num-clients=1", "clients-per-round=1",
                                     "secure-aggregation=false"]).num_clients == 1


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(FedtuneError, match="config file not found"):
        RunConfig.load(path=tmp_path / "nope.toml")


def test_booleans_are_not_numbers(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("num-rounds = true\n")
    with pytest.raises(FedtuneError, match="'num-rounds' must be a number, got True"):
        RunConfig.load(path=path)


def test_a_job_may_tighten_the_node_policy_and_the_node_then_uses_the_tighter_value():
    from flwr.app import Context, RecordDict

    from client.app import policy_of, resolve_config

    job = RunConfig(dp=True, target_epsilon=1.5, target_delta=1e-6, accountant="rdp", num_rounds=2).to_flower()
    node = {"partition-id": 0, "dp": False, "target-epsilon": 2.0, "target-delta": 1e-5, "accountant": "rdp"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=job)
    resolved = resolve_config(context, None)
    assert resolved.dp is True and resolved.target_epsilon == 1.5 and resolved.target_delta == 1e-6
    assert resolved.accountant == "rdp" and resolved.num_rounds == 2
    assert policy_of(context, None).loosenings(RunConfig.from_mapping(job)) == []
    looser = RunConfig(target_epsilon=50.0, accountant="prv")
    reasons = policy_of(context, None).loosenings(looser)
    assert any("target-epsilon=50" in r for r in reasons) and any("accountant=prv" in r for r in reasons)