"""``python -m ipcv_kernels``: the demo runs end to end; ``bench`` reaches the benchmark."""

from __future__ import annotations

import re

import pytest

from ipcv_kernels.__main__ import main


def test_demo_runs_and_ratio_zero_matches(capsys):
    assert main(["demo", "--image-size", "112", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tokens per block.*\n  64 64 64 22 22", out)
    assert "predicted speedup" in out
    diff = float(re.search(r"IPCV\(ratio=0\)\| of the merged output: (\S+)", out).group(1))
    assert diff < 1e-5


def test_bench_command_reaches_the_benchmark(capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    assert "--suite" in capsys.readouterr().out


def test_unknown_command_is_refused(capsys):
    assert main(["frobnicate"]) == 2
