"""Smoke tests of ``python -m ipcv_kernels bench-vllm`` (tiny towers, one or two rounds; behaviour
only, no timing claims): its checks pass, both measures of both variants are timed, and the result
files carry every field; every vLLM row of the family table runs with its checks (``--family``)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from ipcv_kernels.__main__ import main
from ipcv_kernels.bench.vllm import MEASURES, VARIANTS, VLLM_FAMILIES


def test_bench_vllm_smoke_run_writes_every_field(tmp_path, capsys):
    argv = ["bench-vllm", "--preset", "qwen2-vl-tiny", "--cases", "56x56", "112x56", "--ratio", "0.5"]
    argv += ["--prune-layer", "1", "--as-layers", "1", "--neighbors", "4", "--repeats", "2", "--warmup", "1"]
    argv += ["--out", str(tmp_path), "--name", "smoke", "--no-progress"]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "smoke.json").read_text())
    assert payload["benchmark"] == "vllm"
    env = payload["environment"]
    for key in ("vllm", "torch", "transformers", "device_name", "torch_threads", "load_average", "git_commit"):
        assert key in env
    settings = payload["settings"]
    assert settings["model"] == "qwen2-vl-tiny" and settings["dtype"] == "float32"
    assert settings["ipcv"]["ratio"] == 0.5 and settings["ipcv_source"] == "flags"
    assert settings["vision_config"]["hidden_size"] == 64  # the merger feeds the tiny language model
    assert settings["command"] == "python -m ipcv_kernels " + " ".join(argv)
    first, second = payload["cases"]
    assert (first["tokens"], first["kept_tokens"], second["tokens"]) == (16, 8, 32)
    checks = first["checks"]
    assert checks["passed"] and checks["ratio0_vs_unpatched"] <= checks["bound"]
    assert checks["ipcv_vs_transformers_same_plan"] <= checks["bound"]
    # Each on its own plan: must agree too when the plans are the same (else kept as information).
    assert 0 < checks["plans_kept_in_common"] <= 1 and 0 <= checks["plans_same_neighbour_sets"] <= 1
    if checks["plans_kept_in_common"] == checks["plans_same_neighbour_sets"] == 1:
        assert checks["ipcv_vs_transformers"] <= checks["bound"]
    else:
        assert "ipcv_vs_transformers_informative" in checks
    assert second["checks"] is None  # --check first
    assert first["ipcv_tokens_per_block"] == [16, 8, 8, 8]
    for case in (first, second):
        for measure in MEASURES:
            entry = case[measure]
            for variant in VARIANTS:
                assert entry[variant]["median_ms"] > 0 and len(entry[variant]["samples_ms"]) == 2
            assert entry["speedup"] > 0 and entry["bound"] > 1.0 and entry["efficiency"] > 0
            assert entry["speedup_p10"] <= entry["speedup_p90"]
        # vLLM's own time to first token of every timed request.
        assert all(len(case["ttft"][v]["vllm_first_token_latency_ms"]) == 2 for v in VARIANTS)
        # The time-to-first-token bound is the encoder's, diluted by the rest of the request.
        assert 1.0 < case["ttft"]["bound"] <= case["encoder"]["bound"]
        assert 0 < case["ttft"]["encoder_share"] <= 1
        assert len(case["load_average"]) == 3 and isinstance(case["noise_warnings"], list)
    for suffix in (".csv", ".md", ".png"):
        assert (tmp_path / f"smoke{suffix}").stat().st_size > 0
    markdown = (tmp_path / "smoke.md").read_text()
    assert "encoder FLOP bound" in markdown and "TTFT / bound" in markdown and "load average" in markdown
    header = (tmp_path / "smoke.csv").read_text().splitlines()[0].split(",")
    assert {"encoder_speedup", "encoder_bound", "ttft_speedup", "ttft_bound", "too_noisy"} <= set(header)
    assert "wrote " in capsys.readouterr().out


def test_bench_vllm_refuses_cases_it_cannot_run(tmp_path):
    base = ["bench-vllm", "--preset", "qwen2-vl-tiny", "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(ValueError, match="cases"):
        main([*base, "--cases", "56x56*2"])
    with pytest.raises(ValueError, match="prune_layer"):
        main([*base, "--prune-layer", "4"])


def test_every_vllm_row_that_transformers_loads_is_benchmarked():
    """``--family`` takes every row with a vLLM entry; a row without transformers classes (a
    remote-code format) has no reference to check against and is left out, named here."""
    from ipcv_kernels.families import FAMILIES
    from ipcv_kernels.vllm.testing import FAMILIES as CHECKPOINTS

    rows = [row for row in FAMILIES if row.vllm is not None]
    assert set(VLLM_FAMILIES) == {row.id for row in rows if row.hf is not None and row.id in CHECKPOINTS}
    assert {row.id for row in rows} - set(VLLM_FAMILIES) == {row.id for row in rows if row.hf is None}


@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_bench_vllm_runs_every_family_with_its_checks(family, tmp_path):
    """One round on the row's tiny checkpoint (vLLM's processor makes every input, whatever the
    call kind): ratio 0 equals unpatched vLLM, vLLM's IPCV equals transformers' on the same
    weights and image, the tokens per block show the pruning and the FLOP model counts the call."""
    argv = ["bench-vllm", "--family", family, "--cases", "48x80", "--ratio", "0.5", "--prune-layer", "1"]
    argv += ["--as-layers", "1", "--neighbors", "4", "--repeats", "1", "--warmup", "0"]
    argv += ["--out", str(tmp_path), "--name", "smoke", "--no-progress", "--no-plot"]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "smoke.json").read_text())
    assert (payload["settings"]["model"], payload["settings"]["family"]) == (f"{family} (tiny)", family)
    (case,) = payload["cases"]
    checks = case["checks"]
    assert checks["passed"], checks
    assert checks["ratio0_vs_unpatched"] <= checks["bound"]
    assert checks["ipcv_vs_transformers_same_plan"] <= checks["bound"]
    if checks["plans_kept_in_common"] == checks["plans_same_neighbour_sets"] == 1:
        assert checks["ipcv_vs_transformers"] <= checks["bound"]
    blocks = case["ipcv_tokens_per_block"]
    assert blocks[0] == case["tokens"] and blocks[-1] < blocks[0]
    assert 0 < case["kept_tokens"] < case["tokens"]
    assert bool(case["grid_thw"]) != bool(case["tiles_per_image"])  # the row's call kind
    for measure in MEASURES:
        assert all(case[measure][v]["median_ms"] > 0 for v in VARIANTS)
        assert case[measure]["bound"] > 1.0
    assert (tmp_path / "smoke.md").stat().st_size > 0
