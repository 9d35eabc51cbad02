import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedtune.common.protocol import JobWire
from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError
from tests.conftest import make_texts, write_csv
from tests.helpers import fedtune

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_matches_the_typed_defaults():
    """`flwr run` gets the declared defaults (0 / "" where the task decides), so that a run config
    override of `task` or `num-clients` alone resolves the same way as `--set` does."""
    document = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {spec.name.replace("_", "-"): spec.default for spec in fields(RunConfig)}
    declared |= {key: "" for key in JobWire.KEYS}  # a signed job's keys: empty until `fedtune sign-job` fills them
    assert document["tool"]["flwr"]["app"]["config"] == declared


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
    ("target-delta=0", "'target-delta' must lie strictly between 0 and 1"),
    ("target-delta=nan", "'target-delta' must be a number"),
    ("task=chat", "'task' must be one of classification, causal-lm"),
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

    from fedtune.client.app import policy_of, resolve_config

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

# -- defaults that follow the run -------------------------------------------------------------------

def test_clients_per_round_defaults_to_every_client():
    assert RunConfig.load(overrides=["num-clients=3"]).clients_per_round == 3
    assert RunConfig.load(overrides=["num-clients=8", "clients-per-round=4"]).clients_per_round == 4
    assert RunConfig().with_overrides(num_clients=2).clients_per_round == 2  # still "all" after a change
    assert "clients-per-round = 3" in RunConfig.load(overrides=["num-clients=3"]).to_toml()  # written resolved


def test_causal_lm_defaults_are_what_its_config_file_measured_and_explicit_keys_win():
    alone = RunConfig.load(overrides=["task=causal-lm", "data=chatterbot"])
    assert RunConfig.load(path=ROOT / "configs" / "causal-lm.toml") == alone
    assert (alone.lora_variant, alone.learning_rate, alone.partitioner, alone.num_clients, alone.batch_size) == (
        "lora", 5e-3, "category", 3, 32)
    mine = RunConfig.load(overrides=["task=causal-lm", "lora-variant=ffa", "learning-rate=0.05", "num-clients=4",
                                     "partitioner=iid"])
    assert (mine.lora_variant, mine.learning_rate, mine.partitioner, mine.clients_per_round) == ("ffa", 0.05, "iid", 4)
    assert RunConfig.load(overrides=["lora-variant=lora"]).learning_rate == 1e-2  # classification's plain LoRA
    assert RunConfig().with_overrides(task="causal-lm").lora_variant == "lora"
    written = RunConfig.load(overrides=["task=causal-lm"])
    assert RunConfig.from_mapping(tomllib.loads(written.to_toml())) == written


# -- delta at or above 1/N ----------------------------------------------------------------------------

def test_a_large_delta_is_refused_before_the_federation_starts(tmp_path):
    data = write_csv(tmp_path / "d.csv", make_texts(20))
    result = fedtune("simulate", "--out", str(tmp_path / "run"), "--set", f"data={data}",
                     "--set", "target-delta=0.5")
    assert result.returncode == 3 and "Simulating" not in result.stdout, result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: client-0: target-delta=0.5 is not below 1/N") and \
        "--set allow-large-delta=true" in line


def test_a_researcher_may_allow_a_large_delta_in_a_simulation(tiny_config):
    import io

    from rich.console import Console

    from fedtune.simulations.simulate import preflight

    console = Console(file=io.StringIO())
    with pytest.raises(FedtuneError, match="is not below 1/N"):
        preflight(tiny_config(target_delta=0.5), console)
    preflight(tiny_config(target_delta=0.5, allow_large_delta=True), console)  # explicitly allowed: no error


def test_a_jobs_allow_large_delta_is_never_honoured_by_a_deployed_node(tmp_path, tiny_config, tiny_model_dir):
    """Only the node's own config may allow a delta at or above 1/N: a coordinator's job carrying
    allow-large-delta=true is refused like any other, and setting target-delta alone is not enough."""
    from tests.test_malicious_coordinator import _adapter, _assert_refused, _context, _fit

    data = write_csv(tmp_path / "site.csv", make_texts(4), header=("note", "topic"))  # about 11 training records
    node = {"client-id": "hospital-a", "data": str(data), "text-column": "note", "label-column": "topic",
            "ledger-dir": str(tmp_path / "ledger"), "model": str(tiny_model_dir), "secure-aggregation": False,
            "target-delta": 0.2}
    job = tiny_config(model="/srv/coordinator/model", data="/srv/coordinator/test.csv", num_clients=3,
                      num_rounds=2, secure_aggregation=False, target_delta=0.2, allow_large_delta=True)
    reply = _fit(_context(node, job), _adapter(tiny_model_dir))
    _assert_refused(reply, because="target-delta=0.2 is not below 1/N for this node's N training records")
    reply = _fit(_context({**node, "allow-large-delta": True}, job), _adapter(tiny_model_dir), server_round=2)
    assert reply.metrics["status"] == "trained" and reply.num_examples > 0


# -- what trains, by budget ---------------------------------------------------------------------------

def _readme_budget_defaults() -> dict[str, tuple[str, float]]:
    """The "default now" column of the README's table per budget: {"1": ("probe", 2.0), ...}."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Training modes and defaults per budget", 1)[1].split("\n\n| target ε |", 1)[1]
    rows = {}
    for line in table.split("\n\n", 1)[0].splitlines()[2:]:
        budget, default = [cell.strip() for cell in line.strip("|").split("|")][:2]
        mode, step = re.fullmatch(r"([a-z-]+), step ([0-9.]+)", default).groups()
        rows[budget] = (mode, float(step))
    return rows


def test_an_unset_training_mode_follows_the_measured_budget_table_the_readme_shows():
    readme = _readme_budget_defaults()
    assert set(readme) == {"1", "3", "8", "none"}
    for budget, (mode, step) in readme.items():
        overrides = ["dp=false"] if budget == "none" else [f"target-epsilon={budget}"]
        config = RunConfig.load(overrides=overrides)
        assert (config.training_mode, config.probe_learning_rate) == (mode, step), budget
    # Between the measured budgets the smallest row that covers the budget decides.
    assert RunConfig.load(overrides=["target-epsilon=0.5"]).training_mode == readme["1"][0]
    assert RunConfig.load(overrides=["target-epsilon=2"]).probe_learning_rate == readme["3"][1]
    # A key the config sets always wins, and a causal LM has no label head to probe.
    chosen = RunConfig.load(overrides=["target-epsilon=1", "training-mode=adapter", "probe-learning-rate=0.5"])
    assert (chosen.training_mode, chosen.probe_learning_rate) == ("adapter", 0.5)
    causal = RunConfig.load(overrides=["task=causal-lm", "data=chatterbot", "target-epsilon=1"])
    assert causal.training_mode == "adapter"
