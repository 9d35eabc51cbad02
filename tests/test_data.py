import json
from collections import Counter

import pytest

from fedtune.common.data.labelled import load_labelled_texts
from fedtune.common.errors import FedtuneError
from fedtune.common.data.splits import make_federated_splits
from tests.conftest import make_texts, write_csv


def _split(examples, **kw):
    args = dict(num_clients=3, partitioner="iid", dirichlet_alpha=0.5, test_fraction=0.1,
                validation_fraction=0.1, seed=0)
    args.update(kw)
    return make_federated_splits(examples=examples, **args)


def test_bbc_news_loads_five_topics():
    data = load_labelled_texts(data="bbc-news")
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert 2100 < len(data) <= 2225  # the corpus has a few exact duplicates, which are dropped
    assert data.dropped_duplicate == 2225 - len(data) - data.dropped_empty


def test_cleaning_strips_and_drops_empty_and_duplicate_rows(tmp_path):
    rows = [("  hello world ", "a"), ("hello world", "a"), ("", "b"), ("   ", "a"), ("text", ""),
            ("other text", "b")]
    data = load_labelled_texts(data=str(write_csv(tmp_path / "d.csv", rows)))
    assert data.texts == ["hello world", "other text"]
    assert (data.dropped_empty, data.dropped_duplicate) == (3, 1)
    assert data.labels == [0, 1] and data.label_names == ["a", "b"]


def test_jsonl_and_parquet_with_custom_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_texts(5)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "topic": lbl, "id": i}) for i, (t, lbl) in enumerate(rows)))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": [t for t, _ in rows], "topic": [lbl for _, lbl in rows]}), parquet)
    for path in (jsonl, parquet):
        data = load_labelled_texts(data=str(path), text_column="body", label_column="topic")
        assert len(data) == 15 and data.label_names == ["markets", "politics", "sport"]


@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    ("text,topic\nhi,a\n", "has no column 'label' \\(set label-column\\); columns found: text, topic"),
    ("text,label\n ,a\n,b\n", "no examples left after cleaning"),
    ("text,label\nx,a\ny,a\n", "at least 2 distinct labels"),
])
def test_bad_csv_input_is_a_clear_user_error(tmp_path, content, message):
    path = tmp_path / "d.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FedtuneError, match=message):
        load_labelled_texts(data=str(path))


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(FedtuneError, match="line 2 is not valid JSON"):
        load_labelled_texts(data=str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(FedtuneError, match="unsupported data file type '.xlsx'"):
        load_labelled_texts(data=str(path))


def test_iid_splits_are_deterministic_disjoint_and_complete(tmp_path):
    data = load_labelled_texts(data=str(write_csv(tmp_path / "d.csv", make_texts(50))))
    first, second = _split(data), _split(data)
    assert first == second
    assert _split(data, seed=1).test != first.test
    every = list(first.test.texts)
    for client in first.clients:
        every += client.train.texts + client.validation.texts
        assert 40 <= len(client.train) <= 41 and len(client.validation) == 4
    assert sorted(every) == sorted(data.texts)  # nothing lost, nothing shared


def test_dirichlet_partition_skews_labels(tmp_path):
    data = load_labelled_texts(data=str(write_csv(tmp_path / "d.csv", make_texts(200))))
    iid = _split(data, num_clients=4)
    skewed = _split(data, num_clients=4, partitioner="dirichlet", dirichlet_alpha=0.1)

    def top_label_share(split):
        labels = split.train.labels + split.validation.labels
        return max(Counter(labels).values()) / len(labels)

    assert max(top_label_share(c) for c in iid.clients) < 0.5
    assert max(top_label_share(c) for c in skewed.clients) > 0.7


def test_fewer_examples_than_clients_is_refused(tmp_path):
    data = load_labelled_texts(data=str(write_csv(tmp_path / "d.csv", make_texts(2))))
    with pytest.raises(FedtuneError, match="cannot be spread over 10 clients"):
        _split(data, num_clients=10)
