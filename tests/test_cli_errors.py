"""Bad input: one line on stderr, a non-zero exit, no traceback, and nothing started (the CLI
run in this process: the process is not the subject)."""

import pytest

from tests.conftest import make_texts, write_csv
from tests.helpers import fedtune


def _assert_one_line_error(result, expected: str, out_dir):
    assert result.returncode == 3  # bad input, not a crash
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not (out_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("case, expected", [
    ("missing-file", "data file not found"),
    ("missing-column", "has no column 'label'"),
    ("empty-after-cleaning", "no examples left after cleaning"),
    ("fewer-examples-than-clients", "cannot be spread over 5 clients"),
    ("non-numeric-epsilon", "'target-epsilon' must be a number, got 'lots'"),
    ("negative-epsilon", "'target-epsilon' must be a positive number"),
    ("unknown-key", "unknown config key 'num-client'. Did you mean 'num-clients'?"),
    ("delta-above-1-over-n", "client-0: target-delta=0.5 is not below 1/N"),
])
def test_bad_input_gives_a_one_line_error(tmp_path, case, expected):
    data = write_csv(tmp_path / "ok.csv", make_texts(20))
    sets = {
        "missing-file": ["data=" + str(tmp_path / "absent.csv")],
        "missing-column": ["data=" + str(write_csv(tmp_path / "c.csv", make_texts(5), header=("text", "topic")))],
        "empty-after-cleaning": ["data=" + str(write_csv(tmp_path / "e.csv", [("  ", "a"), ("", "b")]))],
        "fewer-examples-than-clients": ["data=" + str(write_csv(tmp_path / "f.csv", make_texts(1)))],
        "non-numeric-epsilon": ["data=" + str(data), "target-epsilon=lots"],
        "negative-epsilon": ["data=" + str(data), "target-epsilon=-2"],
        "unknown-key": ["data=" + str(data), "num-client=3"],
        "delta-above-1-over-n": ["data=" + str(data), "target-delta=0.5"],
    }[case]
    args = ["simulate", "--out", str(tmp_path / "run")]
    for item in sets:
        args += ["--set", item]
    _assert_one_line_error(fedtune(*args), expected, tmp_path / "run")


def test_missing_config_file(tmp_path):
    result = fedtune("simulate", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "run"))
    _assert_one_line_error(result, "config file not found", tmp_path / "run")
