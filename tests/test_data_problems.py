"""Degenerate data stops `fedtune simulate` before any federation starts (no Ray), with one line
that says what to do and quotes no record text and no label value."""

from __future__ import annotations

import time

import pytest

from fedtune.common.data.labelled import load_labelled_texts
from tests.conftest import TOPICS, make_texts, write_csv
from tests.helpers import fedtune

SECRET_LABEL = "rare-diagnosis-x17"
SECRET_TEXT = "patient record zq-4471"


def _simulate(tmp_path, *sets: str):
    args = ["simulate", "--out", str(tmp_path / "run")]
    for item in sets:
        args += ["--set", item]
    started = time.monotonic()
    result = fedtune(*args)
    return result, time.monotonic() - started


def _assert_refused_before_ray(result, seconds: float, tmp_path, *, expected: str, secrets=()) -> str:
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1 and lines[0].startswith("error: "), output
    assert expected in lines[0], lines[0]
    # The federation never started: no "Simulating ..." banner, no Ray or Flower output, no run.
    assert "Simulating" not in output and "Ray" not in output and "flwr" not in output.lower()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and seconds < 60
    assert not any(secret in output for secret in secrets), output
    return lines[0]


def test_swapped_text_and_label_columns_are_refused(tmp_path):
    rows = [(label, text) for text, label in make_texts(20)]  # 3 distinct "texts", 60 distinct "labels"
    data = write_csv(tmp_path / "swapped.csv", rows)
    _assert_refused_before_ray(*_simulate(tmp_path, f"data={data}", "num-clients=2"), tmp_path,
                                      expected="60 of 60 rows share their text with a row of another label; "
                                               "check text-column 'text' and label-column 'label' (swapped?)",
                                      secrets=[*TOPICS, rows[0][1]])


def test_a_label_column_of_ids_is_refused(tmp_path):
    rows = [(text, f"id-{i}") for i, (text, _) in enumerate(make_texts(20))]
    data = write_csv(tmp_path / "ids.csv", rows)
    _assert_refused_before_ray(*_simulate(tmp_path, f"data={data}"), tmp_path,
                               expected="the label column has 60 distinct values over 60 examples",
                               secrets=["id-1", rows[0][0]])


def test_a_label_held_by_one_record_is_refused_without_naming_it(tmp_path):
    data = write_csv(tmp_path / "rare.csv", make_texts(20) + [(SECRET_TEXT, SECRET_LABEL)])
    _assert_refused_before_ray(*_simulate(tmp_path, f"data={data}"), tmp_path,
                               expected="1 of 4 labels have fewer than 10 examples (the rarest 1); label names are "
                                        "sent to every party: drop or merge those labels' rows",
                               secrets=[SECRET_LABEL, SECRET_TEXT])


def test_a_tsv_named_csv_gets_a_rename_hint(tmp_path):
    path = tmp_path / "tabs.csv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lbl}\n" for t, lbl in make_texts(20)))
    _assert_refused_before_ray(*_simulate(tmp_path, f"data={path}"), tmp_path,
                               expected="is tab-separated (its header has 1 tab(s) and no comma); rename it to tabs.tsv",
                               secrets=list(TOPICS))
    renamed = path.rename(tmp_path / "tabs.tsv")
    assert load_labelled_texts(data=str(renamed)).label_names == ["markets", "politics", "sport"]


def test_a_directory_as_data_says_so(tmp_path):
    (tmp_path / "folder").mkdir()
    _assert_refused_before_ray(*_simulate(tmp_path, f"data={tmp_path / 'folder'}"), tmp_path,
                               expected="is a directory; give one .csv/.tsv/.jsonl/.parquet file")


def test_long_fields_load_and_conflicting_rows_are_counted_before_ray(tmp_path):
    """A 200,000-character field (over Python's csv limit of 131072) loads; two rows with the same
    text and different labels are both dropped and reported. A missing model then stops the run
    before Ray, after the data report was printed."""
    rows = make_texts(20) + [("a long one " + "x" * 200_000, "sport"), (SECRET_TEXT, "sport"),
                             (SECRET_TEXT, "politics")]
    data = write_csv(tmp_path / "long.csv", rows)
    result, seconds = _simulate(tmp_path, f"data={data}", f"model={tmp_path / 'no-model'}")
    _assert_refused_before_ray(result, seconds, tmp_path, expected="has no config.json", secrets=[SECRET_TEXT])
    report = " ".join(result.stdout.split())
    assert "61 examples, 3 labels; dropped 0 empty, 2 conflicting (a text seen with different labels)" in report


def test_conflicts_below_the_threshold_are_dropped_not_resolved(tmp_path):
    rows = make_texts(20) + [(SECRET_TEXT, "sport"), (SECRET_TEXT, "politics"), (SECRET_TEXT, "sport"),
                             ("plain duplicate", "sport"), ("plain duplicate", "sport")]
    data = load_labelled_texts(data=str(write_csv(tmp_path / "d.csv", rows)))
    assert SECRET_TEXT not in data.texts and data.texts.count("plain duplicate") == 1
    assert (data.dropped_conflicting, data.dropped_duplicate, len(data)) == (3, 1, 61)


@pytest.mark.parametrize("labels, order", [
    (["10", "2", "1", "11"], ["1", "2", "10", "11"]),
    (["0.5", "-1", "3", "1e1"], ["-1", "0.5", "3", "1e1"]),
    (["class10", "class2", "class1", "b"], ["b", "class1", "class2", "class10"]),
])
def test_labels_sort_in_natural_order(tmp_path, labels, order):
    rows = [(f"text {label} {i}", label) for label in labels for i in range(3)]
    data = load_labelled_texts(data=str(write_csv(tmp_path / "n.csv", rows)))
    assert data.label_names == order
    assert all(data.label_names[y] in t for t, y in zip(data.texts, data.labels))
