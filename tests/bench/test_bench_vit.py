"""Smoke test of the vision-tower benchmark's code path (tiny tower; no timing assertions)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ipcv_kernels.__main__ import main
from ipcv_kernels.bench import environment, measure, results
from ipcv_kernels.bench.towers import load_vision_tower
from ipcv_kernels.bench.vit import Case, parse_case
from ipcv_kernels.testing.models import build_qwen2_vl_model

QWEN_GEOMETRY = SimpleNamespace(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)


def test_parse_case_follows_qwen2_vl_geometry():
    assert parse_case("448x896", QWEN_GEOMETRY) == Case("448x896", "image", ((1, 32, 64),))
    # Pixels round to the nearest multiple of 28, as Qwen2-VL's processor resizes.
    assert parse_case("1024x1024", QWEN_GEOMETRY).grid_thw == ((1, 74, 74),)
    assert parse_case("448x448*3", QWEN_GEOMETRY).grid_thw == ((1, 32, 32),) * 3
    video = parse_case("448x448@16", QWEN_GEOMETRY)
    assert (video.kind, video.grid_thw, video.tokens) == ("video", ((8, 32, 32),), 8192)
    with pytest.raises(ValueError, match="cases"):
        parse_case("448x448@3", QWEN_GEOMETRY)
    with pytest.raises(ValueError, match="cases"):
        parse_case("448", QWEN_GEOMETRY)


def test_smoke_run_writes_every_field(tmp_path):
    argv = ["bench", "--suite", "smoke", "--cases", "56x112", "56x56@4", "--repeats", "1", "--warmup", "1"]
    argv += [
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        "smoke",
        "--no-progress",
        "--breakdown",
    ]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "smoke.json").read_text())
    for key in ("torch", "transformers", "python", "cpu", "device_name", "git_commit", "date_utc"):
        assert key in payload["environment"]
    settings = payload["settings"]
    assert settings["model"] == "qwen2-vl-tiny" and settings["variants"] == ["unpatched", "paper", "ipcv"]
    assert settings["variant_configs"]["paper"]["as_queries"] == "all"
    image, video = payload["cases"]
    assert (image["tokens"], image["kept_tokens"], video["kind"]) == (32, 16, "video")
    assert image["checks"]["passed"] and "ratio0_vs_unpatched" in image["checks"]
    assert "ratio0_vs_unpatched" not in video["checks"]  # --check first
    for case in (image, video):
        assert case["checks"]["passed"]
        # (b) vs (c), or, after a near-tie broken differently, (c) vs (b)'s formulation on (c)'s plan.
        agreement = case["checks"].get("ipcv_vs_paper", case["checks"].get("ipcv_vs_paper_same_planning"))
        assert agreement <= case["checks"]["bound"]
        for stats in case["variants"].values():
            assert stats["median_ms"] > 0 and len(stats["samples_ms"]) == 1
            assert set(stats["memory"]) == {"method", "peak_bytes", "peak_extra_bytes"}
        for key in ("speedup_paper", "speedup_ipcv", "bound_ipcv", "efficiency_ipcv", "ipcv_over_paper"):
            assert case[key] > 0
        assert case["bound_ipcv"] > case["bound_paper"] > 1.0
        # One round: the per-round speedup's p10 and p90 are that round's speedup.
        assert case["speedup_ipcv_p10"] == case["speedup_ipcv_p90"] > 0
        assert len(case["load_average"]) == 3 and isinstance(case["noise_warnings"], list)
    stages = image["variants"]["ipcv"]["breakdown"]["stages"]
    assert list(stages) == ["embed", "full", "stabilised + planning", "pruned", "pruned + restoration", "merger"]
    assert len(image["variants"]["paper"]["breakdown"]["block_ms"]) == 4
    # tokens seen by the blocks: full before the prune layer, kept ones after.
    assert image["ipcv_tokens_per_block"] == [32, 16, 16, 16]
    for suffix in (".csv", ".md", ".png"):
        assert (tmp_path / f"smoke{suffix}").stat().st_size > 0
    markdown = (tmp_path / "smoke.md").read_text()
    assert "(c) FLOP bound" in markdown
    assert "speedup p10-p90 paper " in markdown and "load average" in markdown
    header = (tmp_path / "smoke.csv").read_text().splitlines()[0].split(",")
    assert {"speedup_paper_p10", "speedup_ipcv_p90", "too_noisy"} <= set(header)


def test_attention_backend_variant(tmp_path):
    # (c) with a named ngr_attention backend beside (c) itself: checked against (c), timed, reported.
    base = ["bench", "--suite", "smoke", "--cases", "56x112", "--repeats", "1", "--warmup", "1", "--device", "cpu"]
    base += ["--check", "none", "--no-plot", "--no-progress", "--out", str(tmp_path), "--name", "attn"]
    assert main([*base, "--variants", "unpatched", "ipcv", "ipcv_torch"]) == 0
    payload = json.loads((tmp_path / "attn.json").read_text())
    assert payload["settings"]["variants"] == ["unpatched", "ipcv", "ipcv_torch"]
    assert payload["settings"]["variant_configs"]["ipcv_torch"]["attention_backend"] == "torch"
    (case,) = payload["cases"]
    assert case["checks"]["passed"] and case["checks"]["ipcv_torch_vs_ipcv"] <= case["checks"]["bound"]
    assert case["speedup_ipcv_torch"] > 0 and case["efficiency_ipcv_torch"] > 0
    assert "ipcv_torch speedup" in (tmp_path / "attn.md").read_text()
    with pytest.raises(ValueError, match="unknown variant"):
        main([*base, "--variants", "fast"])
    with pytest.raises(ValueError, match="not available on cpu"):
        main([*base, "--variants", "ipcv_torch_varlen"])


def test_checkpoint_loading_reads_only_the_vision_tower(tmp_path):
    model = build_qwen2_vl_model()
    model.save_pretrained(tmp_path)
    tower = load_vision_tower(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    expected = model.model.visual
    pixels, grid_thw = torch.randn(64, 24), torch.tensor([[1, 8, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(tower(pixels, grid_thw).pooler_output, expected(pixels, grid_thw).pooler_output)
    assert set(tower.state_dict()) == set(expected.state_dict())
    with pytest.raises(ValueError, match="model"):
        load_vision_tower(tmp_path / "missing", dtype=torch.float32, device=torch.device("cpu"))


def test_timing_statistics_and_interleaving():
    timing = measure.Timing((5.0, 1.0, 3.0, 2.0, 4.0))
    assert (timing.median_ms, timing.min_ms) == (3.0, 1.0)
    assert timing.p10_ms == pytest.approx(1.4) and timing.p90_ms == pytest.approx(4.6)  # numpy's linear rule
    assert timing.iqr_ms == pytest.approx(2.0)
    calls: list[str] = []
    timings = measure.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        torch.device("cpu"),
        warmup=1,
        repeats=3,
    )
    # Warm-up per variant, then rounds whose starting variant rotates.
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(t.samples_ms) for t in timings.values()] == [3, 3]


def test_module_times_and_result_files(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    out, ms = measure.time_modules(lambda: model(torch.randn(4, 8)), {"linear": model[0]}, torch.device("cpu"))
    assert out.shape == (4, 8) and ms["linear"] > 0
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    _, memory = measure.measure_peak_memory(lambda: torch.ones(1 << 20), torch.device("cpu"))
    assert memory.method in ("linux_rss_high_water", "unavailable")
    files = results.ResultFiles(tmp_path, "run")
    files.write_csv([{"a": 1}, {"a": 2, "b": 3.5}])
    assert (tmp_path / "run.csv").read_text().splitlines() == ["a,b", "1,", "2,3.5"]
    table = results.markdown_table(
        [{"x": 1.23456, "y": None}], [results.Column("x", "X", ".2f"), results.Column("y", "Y")]
    )
    assert table.splitlines()[-1] == "| 1.23 | - |"


def test_speedup_spread_and_noise_verdict(monkeypatch):
    base, fast = measure.Timing((10.0, 12.0, 30.0)), measure.Timing((5.0, 6.0, 10.0))
    assert measure.round_speedups(base, fast) == (2.0, 2.0, 3.0)
    spread = measure.Spread.of(measure.round_speedups(base, fast))
    assert (spread.p10, spread.median, spread.p90) == (pytest.approx(2.0), 2.0, pytest.approx(2.8))
    with pytest.raises(ValueError, match="rounds"):
        measure.round_speedups(base, measure.Timing((1.0,)))
    monkeypatch.setattr(measure, "usable_cores", lambda: 2)
    steady = measure.Spread(1.9, 2.0, 2.1)
    assert measure.noise_warnings({"ipcv": steady}, [1.5, 1.0, 1.0]) == []
    (wide,) = measure.noise_warnings({"ipcv": spread}, [1.5, 1.0, 1.0])
    assert wide.startswith("ipcv: ") and "40%" in wide
    (busy,) = measure.noise_warnings({"ipcv": steady}, [3.5, 1.0, 1.0])
    assert "load average (3.5) exceeds the 2 core(s)" in busy


def test_environment_outside_a_checkout_has_no_commit(monkeypatch, tmp_path):
    # An installed package: git finds no work tree whose ipcv_kernels/ is the imported package.
    monkeypatch.setattr(environment, "_run_git", lambda cwd, *args: str(tmp_path) if "--show-toplevel" in args else "x")
    environment.source_checkout.cache_clear()
    try:
        assert environment.source_checkout() is None
        env = environment.environment(torch.device("cpu"))
        assert env["git_commit"] is None and env["git_dirty"] is None
        assert "commit `unknown`" in environment.environment_markdown(env)
    finally:
        environment.source_checkout.cache_clear()
