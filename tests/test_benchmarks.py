"""The benchmark suite's own pieces: generated BENCHMARKS.md blocks and the communication figures."""

from __future__ import annotations

import pytest

from benchmarks import harness


def test_generated_blocks_are_replaced_in_place_and_new_ones_appended(tmp_path, monkeypatch):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n\nprose before\n<!-- a:begin -->\nold\n<!-- a:end -->\nprose after\n")
    monkeypatch.setattr(harness, "BENCHMARKS_MD", doc)
    harness.update_benchmarks_md("new | table", name="a")
    harness.update_benchmarks_md("second", name="b")
    text = doc.read_text()
    assert "old" not in text and "prose before\n<!-- a:begin -->\nnew | table\n<!-- a:end -->\nprose after" in text
    assert text.rstrip().endswith("<!-- b:begin -->\nsecond\n<!-- b:end -->")
    harness.update_benchmarks_md("third", name="b")  # replacing does not duplicate
    assert doc.read_text().count("<!-- b:begin -->") == 1 and "third" in doc.read_text()


def test_an_adapter_update_is_under_one_percent_of_minilm_and_ffa_sends_about_half():
    from benchmarks.communication import measure

    rows = {r["variant"]: r for r in measure(task="classification", label="MiniLM")}
    lora, ffa = rows["lora"], rows["ffa"]
    assert lora["model_parameters"] > 20_000_000  # all-MiniLM-L6-v2 has 22.7M parameters
    for row in (lora, ffa):
        assert row["secagg_bytes"] < 0.01 * row["full_model_bytes"]
        # SecAgg+ sends int64 words where plain FedAvg sends float32 (plus one weight array).
        assert row["secagg_bytes"] == pytest.approx(2 * row["plain_bytes"], rel=0.01)
    # FFA-LoRA drops every A (r x in): 12 of them (6 layers x query/value), 8 x 384 each.
    assert lora["adapter_parameters"] - ffa["adapter_parameters"] == 12 * 8 * 384
