"""``benchmarks/gpu_suite.sh`` is run on a lent GPU that no test here reaches, often once: what each
step runs is checked before that moment by running the script itself with ``python`` and
``nvidia-smi`` replaced by stubs that record their arguments (and succeed, or fail where a test
says so). The recorded benchmark command lines must parse and fit the presets."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BENCHMARKS, load_benchmark_script

from ipcv_kernels.__main__ import build_parser
from ipcv_kernels.bench import towers, vit
from ipcv_kernels.bench.variants import VARIANTS, attention_variant_backend

SUITE = BENCHMARKS / "gpu_suite.sh"
ALL_STEPS = ["env", "install", "tests", "vit_targets", "vit_more", "ops", "plan", "vllm", "sglang"]
INSTALL = ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
# Records "<program> TAB <TRITON_INTERPRET or unset> TAB <arguments, shell-quoted>"; `python -`
# drains its script from stdin; exits 1 when the arguments match the regex $STUB_FAILS.
STUB = r"""#!/usr/bin/env bash
{ printf '%s\t%s\t' "$(basename "$0")" "${TRITON_INTERPRET-unset}"; [ $# -eq 0 ] || printf '%q ' "$@"; printf '\n'; } >>"$STUB_LOG"
if [ "${1-}" = "-" ]; then cat >/dev/null; fi
if [ -n "${STUB_FAILS-}" ] && [[ "$*" =~ $STUB_FAILS ]]; then exit 1; fi
exit 0
"""


@dataclass(frozen=True)
class Call:
    program: str
    triton_interpret: str
    argv: list[str]


class StubbedSuite:
    """A copy of the script in a checkout of its own (so that the install marker and ``out/`` stay
    there), with every ``bench_*.py`` name of the repository present (unrun: ``python`` is a stub)."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "checkout"
        (self.root / "benchmarks").mkdir(parents=True)
        shutil.copy(SUITE, self.root / "benchmarks")
        for script in BENCHMARKS.glob("bench_*.py"):
            (self.root / "benchmarks" / script.name).touch()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for program in ("python", "nvidia-smi"):
            (self.bin / program).write_text(STUB)
            (self.bin / program).chmod(0o755)
        self.out = tmp_path / "out"
        self.log = tmp_path / "calls.log"

    def run(self, *steps: str, fails: str | None = None) -> list[Call]:
        """Run the suite's ``steps`` (none: all); the stubbed calls, probes (``python -c``) included.
        The script's own output is kept in ``self.output``."""
        self.log.write_text("")
        env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "OUT": str(self.out),
            "STUB_LOG": str(self.log),
            "TRITON_INTERPRET": "1",  # as in the test suite: the script must unset it
            "STUB_FAILS": fails or "",
        }
        done = subprocess.run(
            ["bash", str(self.root / "benchmarks" / "gpu_suite.sh"), *steps],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        self.output = done.stdout + done.stderr
        assert done.returncode == 0, self.output
        calls = []
        for line in self.log.read_text().splitlines():
            program, interpret, arguments = line.split("\t")
            calls.append(Call(program, interpret, shlex.split(arguments)))
        return calls

    def summary(self) -> list[str]:
        return (self.out / "summary.txt").read_text().splitlines()


def commands(calls: list[Call]) -> list[list[str]]:
    """The calls without the probes (``python -c``), as ``[program, *argv]``."""
    return [[call.program, *call.argv] for call in calls if call.argv[:1] != ["-c"]]


@pytest.fixture
def suite(tmp_path) -> StubbedSuite:
    return StubbedSuite(tmp_path)


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_install_keeps_the_images_packages(suite):
    # --no-deps: the image's CUDA torch (below the declared floor) and the rest stay as they are.
    assert commands(suite.run("install")) == [["python", *INSTALL]]
    assert suite.summary()[-1].startswith("install rc=0 ")


def test_install_falls_back_to_an_in_place_build(suite):
    assert commands(suite.run("install", fails="pip install")) == [
        ["python", *INSTALL],
        ["python", "setup.py", "build_ext", "--inplace"],
    ]


def test_tests_step_runs_the_compiled_suite_after_one_install(suite):
    pytest_command = ["python", "-m", "pytest", "-q", "-rs", "tests", f"--junitxml={suite.out}/pytest-gpu.xml"]
    calls = suite.run("tests")
    assert commands(calls) == [["python", *INSTALL], pytest_command]
    assert {call.triton_interpret for call in calls} == {"unset"}  # Triton compiles for the GPU
    assert commands(suite.run("tests")) == [pytest_command]  # the install was attempted already


def test_env_step_reports_the_device_and_versions(suite):
    assert commands(suite.run("env")) == [["nvidia-smi"], ["python", "-"]]


def bench_vit_settings(argv: list[str]) -> tuple:
    args = build_parser().parse_args(["bench", *argv[1:]])
    settings = vit.settings_from_args(args)
    config = towers.vision_config_from_preset(settings["model"])
    settings["ipcv"].check_depth(config.depth)
    tokens = [vit.parse_case(text, config).tokens for text in settings["cases"]]
    for variant in args.variants:
        if variant not in VARIANTS:
            attention_variant_backend(variant)  # raises for an unknown attention backend
    return args, settings, tokens


@pytest.mark.parametrize("varlen", [True, False], ids=["with-varlen", "without-varlen"])
def test_vit_steps_run_the_targets_and_the_other_inputs(suite, varlen):
    runs = commands(suite.run("vit_targets", "vit_more", fails=None if varlen else "torch.nn.attention.varlen"))
    assert runs[0] == ["python", *INSTALL]
    assert [run[:2] for run in runs[1:]] == [["python", "benchmarks/bench_vit.py"]] * 2
    (targets_args, targets, targets_tokens), (more_args, more, _) = (bench_vit_settings(run[1:]) for run in runs[1:])
    for args, settings in ((targets_args, targets), (more_args, more)):
        assert args.out == suite.out / "results" and args.device == "cuda"  # raw results under $OUT
        assert settings["model"] == "qwen2-vl-7b" and settings["dtype"] == "bfloat16"
        ipcv = settings["ipcv"]
        assert (ipcv.ratio, ipcv.prune_layer, ipcv.as_layers) == (0.65, 3, 7)  # the GPU targets' setting
        assert args.on_check_failure == "warn"  # a failed check is recorded, the case still timed
    assert targets_tokens == [1024, 4096, 16384]  # 1k / 4k / 16k tokens per image
    expected = ["unpatched", "paper", "ipcv", *(["ipcv_torch_varlen"] if varlen else [])]
    assert targets_args.variants == expected and targets_args.breakdown
    assert more.get("cases") == ["1024x1024", "2048x2048", "448x448*8", "448x448@16"]


@pytest.mark.parametrize(("step", "script"), [("ops", "bench_ops"), ("plan", "bench_plan")])
def test_op_and_plan_steps_run_their_scripts_on_cuda(suite, step, script):
    runs = commands(suite.run(step))
    assert runs[0] == ["python", *INSTALL] and len(runs) == 2
    assert runs[1][:2] == ["python", f"benchmarks/{script}.py"]
    args = load_benchmark_script(script).parse_args(runs[1][2:])
    assert args.out == suite.out / "results" and args.device == "cuda"


def test_vllm_step_runs_the_benchmark_where_vllm_imports(suite):
    from ipcv_kernels.bench import vllm as bench_vllm

    runs = commands(suite.run("vllm"))
    assert runs[0] == ["python", *INSTALL] and runs[1][:2] == ["python", "benchmarks/bench_vllm.py"]
    args = build_parser().parse_args(["bench-vllm", *runs[1][2:]])
    assert args.out == suite.out / "results" and (args.preset, args.dtype) == ("qwen2-vl-7b", "bfloat16")
    config = bench_vllm.bench_vision_config(args.preset)
    bench_vllm.ipcv_from_args(args).check_depth(config.depth)
    assert [bench_vllm.parse_image_case(text, config).tokens for text in args.cases] == [1024, 4096]


def test_vllm_step_records_the_skip_without_vllm(suite):
    assert commands(suite.run("vllm", fails="import vllm")) == []  # no install, no benchmark
    assert suite.summary() == ["vllm: skipped, vLLM is not importable here", suite.summary()[1]]
    assert suite.summary()[1].startswith("vllm rc=0 ")


def test_sglang_step_runs_the_server_benchmark_where_sglang_imports(suite):
    runs = commands(suite.run("sglang"))
    assert runs[0] == ["python", *INSTALL] and runs[1][:2] == ["python", "benchmarks/bench_sglang.py"]
    script = load_benchmark_script("bench_sglang")
    args = script.build_parser().parse_args(runs[1][2:])
    script.check_args(args)  # the preset, the recommended setting on its tower, the memory shares
    assert args.out == suite.out / "results" and (args.preset, args.dtype) == ("qwen2-vl-7b", "bfloat16")
    assert args.cases == [(448, 448), (896, 896)]


def test_sglang_step_records_the_skip_without_sglang(suite):
    assert commands(suite.run("sglang", fails="import sglang")) == []  # no install, no benchmark
    assert suite.summary() == ["sglang: skipped, SGLang is not importable here", suite.summary()[1]]
    assert suite.summary()[1].startswith("sglang rc=0 ")


def test_whole_suite_runs_every_step_in_order_and_new_scripts_too(suite):
    (suite.root / "benchmarks" / "bench_new.py").touch()
    runs = commands(suite.run(fails="bench_ops"))  # a failing step does not stop the others
    steps = [line.split(" rc=")[0] for line in suite.summary() if " rc=" in line]
    assert steps == [*ALL_STEPS, "bench_new"]
    assert next(line for line in suite.summary() if line.startswith("ops rc=")).startswith("ops rc=1 ")
    assert runs.count(["python", *INSTALL]) == 1  # once, by the install step
    scripts = [run[1] for run in runs if run[0] == "python" and run[1].startswith("benchmarks/")]
    assert scripts == [
        "benchmarks/bench_vit.py",
        "benchmarks/bench_vit.py",
        "benchmarks/bench_ops.py",
        "benchmarks/bench_plan.py",
        "benchmarks/bench_vllm.py",
        "benchmarks/bench_sglang.py",
        "benchmarks/bench_new.py",
    ]
    assert runs[-1] == ["python", "benchmarks/bench_new.py", "--device", "cuda", "--out", f"{suite.out}/results"]


def test_unknown_step_is_named_and_the_others_run(suite):
    assert commands(suite.run("nope", "env")) == [["nvidia-smi"], ["python", "-"]]
    assert "unknown step: nope" in suite.output


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
