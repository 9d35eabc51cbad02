"""The prepared GPU check (`make gpu-check`) runs its every line on this CPU, and refuses plainly
where there is no GPU: the script a GPU session runs once is known to work before it gets there."""

from __future__ import annotations

import torch

from benchmarks import gpu_check


def test_every_line_of_the_gpu_check_passes_on_the_cpu(capsys):
    assert gpu_check.main(["--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == len(gpu_check.CHECKS) == 5 and all(line.startswith("ok") for line in lines), lines


def test_without_a_gpu_it_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "torch sees no CUDA GPU here" in capsys.readouterr().err
