"""``python -m ipcv_kernels``: one parser with a subcommand per ``SUBCOMMANDS`` entry; the demo
runs end to end and reports its spread; ``bench`` reaches the benchmark and writes under the
current directory by default."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from ipcv_kernels import fidelity
from ipcv_kernels.__main__ import SUBCOMMANDS, main
from ipcv_kernels._help_text import plain_text

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_and_ratio_zero_matches(capsys):
    assert main(["demo", "--image-size", "112", "--repeats", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tokens per block.*\n  64 64 64 22 22", out)
    assert "predicted speedup" in out
    diff = float(re.search(r"IPCV\(ratio=0\)\| of the merged output: (\S+)", out).group(1))
    assert diff < 1e-5


def test_demo_reports_spread_load_and_a_noise_verdict(capsys):
    assert main(["demo", "--image-size", "56", "--repeats", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # p10-p90 of both variants' per-round times and of the per-round speedups.
    assert len(re.findall(r"wall time, \w+: +[\d.]+ ms +\(p10-p90 [\d.]+-[\d.]+ ms\)", out)) == 2
    assert re.search(r"measured speedup [\d.]+x \(ratio of the medians; per round: median [\d.]+x, p10-p90 ", out)
    assert re.search(r"host load average [\d.]+ / [\d.]+ / [\d.]+ \(1 / 5 / 15 min\), \d+ usable core", out)
    assert ("TOO NOISY TO TRUST" in out) != ("spread within limits" in out)


def test_bench_command_reaches_the_benchmark(capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    assert "--suite" in capsys.readouterr().out


def test_unknown_command_is_refused(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_top_level_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out, re.MULTILINE), name  # listed with its help line


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_help_on_every_flag(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m ipcv_kernels {name}")
    # Every flag's entry carries help text after its name (on its line or the next ones).
    entries = re.split(r"\n  (?=-)", out.split("options:", 1)[1])[1:]
    assert entries and all("  " in entry.strip() for entry in entries)
    if name == "bench":
        assert "(default: ipcv_results/vit)" in " ".join(out.split())
        assert "(default: None)" not in out and "(default: False)" not in out


# reStructuredText inline markup: literals, roles, interpreted text, a literal-block marker.
RST_MARKUP = re.compile(r"``|:[a-z]+:`|`[^`\n]*`|::$", re.MULTILINE)
BENCHMARK_SCRIPTS = sorted(path.name for path in (REPO / "benchmarks").glob("bench_*.py"))


def test_plain_text_strips_inline_markup():
    text = "See :class:`~ipcv_kernels.config.IPCVConfig`, :func:`apply_ipcv`, ``x = 1`` and `y`. From Python::"
    assert plain_text(text) == "See IPCVConfig, apply_ipcv, x = 1 and y. From Python:"
    assert plain_text("no markup: a::b stays") == "no markup: a::b stays"


@pytest.mark.parametrize("command", [[], *([name] for name in SUBCOMMANDS)], ids=lambda c: " ".join(c) or "top")
def test_subcommand_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m ipcv_kernels" in out
    assert RST_MARKUP.findall(out) == []


def test_standalone_fidelity_help_is_plain_text():
    out = fidelity.cli.parser().format_help()
    assert "cosine similarity" in out  # the module docstring, as the description
    assert RST_MARKUP.findall(out) == []


@pytest.mark.parametrize("script", BENCHMARK_SCRIPTS)
def test_benchmark_script_help_is_plain_text(script, monkeypatch, capsys):
    path = REPO / "benchmarks" / script
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(path), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--out" in out
    assert RST_MARKUP.findall(out) == []


def test_bare_invocation_prints_the_top_level_help(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: python -m ipcv_kernels" in captured.err
    for name in SUBCOMMANDS:
        assert name in captured.err


def test_module_and_script_entry_points(tmp_path):
    # The real processes: python -m ipcv_kernels (bare: help, status 2) and benchmarks/bench_vit.py.
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    bare = subprocess.run([sys.executable, "-m", "ipcv_kernels"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bare.returncode == 2 and "bench" in bare.stderr and "demo" in bare.stderr
    script = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_vit.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert script.returncode == 0 and "--suite" in script.stdout


def test_bench_without_out_writes_under_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    committed = REPO / "benchmarks" / "results"
    before = {path: path.stat().st_mtime_ns for path in committed.iterdir()}
    argv = ["bench", "--suite", "smoke", "--cases", "56x56", "--repeats", "1", "--warmup", "0"]
    argv += ["--device", "cpu", "--check", "none", "--no-plot", "--no-progress"]
    assert main(argv) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "ipcv_results/vit/vit_smoke.csv",
        "ipcv_results/vit/vit_smoke.json",
        "ipcv_results/vit/vit_smoke.md",
    ]
    assert {path: path.stat().st_mtime_ns for path in committed.iterdir()} == before
    payload = json.loads((tmp_path / "ipcv_results" / "vit" / "vit_smoke.json").read_text())
    assert payload["settings"]["command"] == "python -m ipcv_kernels " + " ".join(argv)
    assert "wrote ipcv_results/vit/vit_smoke.json" in capsys.readouterr().out


def test_demo_runs_a_preset_of_another_family(capsys, monkeypatch):
    # The CLIP ViT-L/14-336 preset at depth 2 (a real width, fast enough): one 336-pixel image,
    # the family's recommended setting with P=1, and ratio 0 equal to the unpatched tower.
    from ipcv_kernels.families import Preset, family, shapes

    shallow = Preset({**shapes.CLIP_VIT_L_336, "num_hidden_layers": 2})
    monkeypatch.setitem(family("clip").presets, "clip-vit-l-336-d8", shallow)
    assert main(["demo", "--preset", "clip-vit-l-336-d8", "--prune-layer", "1", "--repeats", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(CLIP, depth 2" in out and "= 577 tokens" in out
    assert re.search(r"tokens per block.*\n  577 202\n", out)
    diff = float(re.search(r"IPCV\(ratio=0\)\| of the last hidden state: (\S+)", out).group(1))
    assert diff < 1e-4


def _saved(family, path):
    from ipcv_kernels.families import build_model, build_tower

    if family.endswith("_tower"):
        build_tower(family.removesuffix("_tower")).save_pretrained(path)
    else:
        build_model(family).save_pretrained(path)
    return path


# Saved tiny checkpoints: (what is saved, the family the demo must find, what it must say).
DEMO_CHECKPOINTS = [
    ("qwen2_vl", "Qwen2-VL", "input grid_thw [[1, 8, 8]] = 64 patch tokens"),
    ("qwen2_5_vl", "Qwen2.5-VL", "input grid_thw [[1, 8, 8]] = 64 patch tokens"),
    ("internvl", "InternVL", "input 1 tile(s) of 17 tokens"),
    ("llava", "LLaVA 1.5", "reads hidden_states[-2] (the output of block(s) 4 of 0-5): block 5 runs neither"),
    ("gemma3", "Gemma 3", "input 1 tile(s) of 16 tokens"),
    ("llava_next", "LLaVA-NeXT", "(the output of block(s) 4 of 0-5)"),
    ("idefics3", "Idefics3", "input 1 tile(s) of 16 tokens"),
    ("siglip_tower", "SigLIP", "input 1 tile(s) of 16 tokens"),
]


@pytest.mark.parametrize(("saved", "family", "says"), DEMO_CHECKPOINTS)
def test_demo_runs_a_checkpoint_of_any_family(saved, family, says, tmp_path, capsys):
    path = _saved(saved, tmp_path / saved)
    argv = ["demo", "--model", str(path), "--image-size", "16", "--prune-layer", "2", "--repeats", "1"]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {path} ({family}, depth 6, its own weights, random pixels)" in out
    assert says in out
    diff = float(re.search(r"IPCV\(ratio=0\)\| of the [\w ]+: (\S+)", out).group(1))
    assert diff < 1e-5


def test_demo_refuses_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        main(["demo", "--model", str(tmp_path), "--no-progress"])


def test_demo_preset_of_llava_reads_its_feature_layer(capsys, monkeypatch):
    # LLaVA-1.5's tower at depth 3 (real width): layer -2 is block 1, block 2 runs in neither variant.
    from dataclasses import replace

    from ipcv_kernels.families import family, shapes

    llava = family("llava").presets["llava-1.5-7b"]
    shallow = replace(llava, vision={**shapes.CLIP_VIT_L_336, "num_hidden_layers": 3})
    monkeypatch.setitem(family("llava").presets, "llava-1.5-7b", shallow)
    assert main(["demo", "--preset", "llava-1.5-7b", "--prune-layer", "1", "--repeats", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(LLaVA 1.5, depth 3, random weights" in out and "block 2 runs neither" in out
    assert re.search(r"tokens per block.*\n  577 202\n", out)
    diff = float(re.search(r"IPCV\(ratio=0\)\| of the features read: (\S+)", out).group(1))
    assert diff < 1e-4
