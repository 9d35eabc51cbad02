"""The prepared GPU check (`make gpu-check`) runs its every line on this CPU, and refuses plainly
where there is no GPU: the script a GPU session runs once is known to work before it gets there.
Only the 1B line is skipped here (a billion parameters on 2 cores: benchmarks.quantized_memory);
the nf4 lines run, bitsandbytes' 4-bit layers work on this CPU."""

from __future__ import annotations

import torch

from benchmarks import gpu_check


def test_every_line_of_the_gpu_check_passes_on_the_cpu(capsys):
    assert gpu_check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("ok", "skip", "FAIL"))]
    assert len(lines) == len(gpu_check.CHECKS) == 12, lines
    skipped = [line for line in lines if line.startswith("skip")]
    assert len(skipped) == 1 and "skipped on cpu (see benchmarks.quantized_memory)" in skipped[0], skipped
    assert all(line.startswith("ok") for line in lines if line not in skipped), lines
    assert "audit consistent" in "".join(line for line in lines if "federation" in line)  # a simulation: unattested
    assert "pip install torch==" in lines[-1] and "gpu-check on cpu: 11 ok, 1 skipped, 0 failed" in out


def test_a_failing_line_fails_the_check_and_the_rest_still_run(monkeypatch, capsys):
    def broken(device, folder):
        raise AssertionError("on purpose")

    monkeypatch.setattr(gpu_check, "CHECKS", [("broken", broken), ("fine", lambda device, folder: "fine")])
    assert gpu_check.run("cpu") == 1
    out = capsys.readouterr().out
    assert "FAIL  broken: AssertionError: on purpose" in out and "ok    fine: fine" in out


def test_the_1b_line_measures_every_precision_here_on_a_tiny_model(monkeypatch):
    """What the 1B line does per precision (build, a warm-up and a timed DP step, free), on the
    tiny random Llama and 64 tokens, the CUDA memory calls stubbed: it runs before a GPU does."""
    from benchmarks.random_llama import random_llama_folder

    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 3 * 2**30)
    line = gpu_check._step_per_precision("cpu", random_llama_folder("tiny"), length=64)
    assert [part.split()[0] for part in line.split("; ")] == ["fp32", "bf16", "nf4"], line
    assert all(part.endswith(" s 3.0 GiB") for part in line.split("; ")), line


def test_the_pip_line_names_the_cuda_of_the_torch_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "--index-url https://download.pytorch.org/whl/cu128" in gpu_check.torch_build("cpu", None)


def test_without_a_gpu_it_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "torch sees no CUDA GPU here" in capsys.readouterr().err
