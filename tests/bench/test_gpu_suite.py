"""``benchmarks/gpu_suite.sh`` is run on a lent GPU that no test here reaches, often once: its
benchmark command lines must parse, and their cases must fit the presets, before that moment."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCHMARKS, load_benchmark_script

from ipcv_kernels.__main__ import build_parser
from ipcv_kernels.bench import towers, vit
from ipcv_kernels.bench.variants import VARIANTS, attention_variant_backend

SUITE = BENCHMARKS / "gpu_suite.sh"


def benchmark_commands(script: str) -> dict[str, list[list[str]]]:
    """``{script name: [argv, ...]}`` of every ``python benchmarks/<name>.py ...`` line (with its
    backslash continuations); shell variables become placeholder values."""
    text = script.replace("\\\n", " ")
    commands: dict[str, list[list[str]]] = {}
    for match in re.finditer(r"python benchmarks/(\w+)\.py([^\n]*)", text):
        arguments = match.group(2).replace('"${variants[@]}"', "unpatched paper ipcv ipcv_torch_varlen")
        arguments = arguments.replace('"$OUT/results"', "/tmp/out")
        commands.setdefault(match.group(1), []).append(shlex.split(arguments))
    return commands


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_bench_vit_command_lines_parse_and_fit_the_preset():
    commands = benchmark_commands(SUITE.read_text())["bench_vit"]
    assert len(commands) == 2  # the targets and the other inputs
    tokens = []
    for argv in commands:
        args = build_parser().parse_args(["bench", *argv])
        assert args.out == Path("/tmp/out")  # the raw results go under $OUT
        settings = vit.settings_from_args(args)
        assert settings["model"] == "qwen2-vl-7b" and settings["dtype"] == "bfloat16"
        ipcv = settings["ipcv"]
        assert (ipcv.ratio, ipcv.prune_layer, ipcv.as_layers) == (0.65, 3, 7)  # the GPU targets' setting
        config = towers.vision_config_from_preset(settings["model"])
        ipcv.check_depth(config.depth)
        tokens.append([vit.parse_case(text, config).tokens for text in settings["cases"]])
        for variant in args.variants:
            if variant not in VARIANTS:
                attention_variant_backend(variant)
    assert tokens[0] == [1024, 4096, 16384]  # the targets: 1k / 4k / 16k tokens per image


@pytest.mark.parametrize("name", ["bench_ops", "bench_plan"])
def test_other_benchmark_command_lines_parse(name):
    commands = benchmark_commands(SUITE.read_text()).get(name, [])
    generic = [["--device", "cuda", "--out", "/tmp/out"]]  # run_other_benchmark's arguments
    for argv in commands or generic:
        assert load_benchmark_script(name).parse_args(argv).out == Path("/tmp/out")  # under $OUT


def test_readme_bench_commands_parse_and_regenerate_into_results():
    """``benchmarks/README.md``'s ``python -m ipcv_kernels bench`` lines parse; the ones that
    regenerate committed files name ``--out benchmarks/results``, the others leave the default."""
    text = (BENCHMARKS / "README.md").read_text().replace("\\\n", " ")
    lines = re.findall(r"^python -m ipcv_kernels (bench [^#\n]*)", text, re.MULTILINE)
    assert len(lines) >= 5
    outs = []
    for line in lines:
        argv = shlex.split(line)
        if "--help" in argv:
            continue
        outs.append(build_parser().parse_args(argv).out)
    assert Path("benchmarks/results") in outs and Path("ipcv_results/vit") in outs


def test_vllm_step_parses_and_skips_without_vllm():
    """The ``vllm`` step: its command line parses (the 7B tower, bf16, 1k / 4k tokens per image,
    raw results under $OUT), and the step records a skip where vLLM is not importable."""
    from ipcv_kernels.bench import vllm as bench_vllm

    script = SUITE.read_text()
    (argv,) = benchmark_commands(script)["bench_vllm"]
    args = build_parser().parse_args(["bench-vllm", *argv])
    assert args.out == Path("/tmp/out") and (args.preset, args.dtype) == ("qwen2-vl-7b", "bfloat16")
    config = bench_vllm.bench_vision_config(args.preset)
    bench_vllm.ipcv_from_args(args).check_depth(config.depth)
    assert [bench_vllm.parse_image_case(text, config).tokens for text in args.cases] == [1024, 4096]
    assert "vllm: skipped, vLLM is not importable here" in script
    assert re.search(r"^\s+STEPS=\(.* vllm\)$", script, re.MULTILINE)  # a default step


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import vllm.entrypoints.llm"], capture_output=True).returncode == 0,
    reason="vLLM is importable here: the step would run the benchmark",
)
def test_vllm_step_without_vllm_records_the_skip(tmp_path):
    import os

    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SUITE), "vllm"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0] == "vllm: skipped, vLLM is not importable here"
    assert summary[1].startswith("vllm rc=0 ")
