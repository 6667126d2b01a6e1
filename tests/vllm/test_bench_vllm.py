"""Smoke tests of ``python -m ipcv_kernels bench-vllm`` (tiny towers, one or two rounds; behaviour
only, no timing claims): its checks pass, both measures of both variants are timed, and the result
files carry every field; every vLLM row of the family table runs with its checks (``--family``);
every preset of those rows is built with a processor of its tower's size, and one preset of each
non-Qwen call kind runs with its checks at a reduced width (``--preset``)."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from ipcv_kernels.__main__ import main
from ipcv_kernels.bench.vllm import MEASURES, VARIANTS, VLLM_FAMILIES, timing
from ipcv_kernels.bench.vllm.cases import PRESETS, Target, target_from_args


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
    # Prune layer 2: every tiny tower takes it (MiniCPM-V's merges 2 x 2 after block 0, so IPCV
    # starts at block 2 there), as in test_vllm_families.py.
    argv = ["bench-vllm", "--family", family, "--cases", "48x80", "--ratio", "0.5", "--prune-layer", "2"]
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


# A preset's tower at a reduced width (its depth, patch and image geometry kept, so that images are
# processed, tiled and counted as for the real tower): every width field of the family's configs.
REDUCED_WIDTH = {
    "hidden_size": 64,
    "embed_dim": 64,
    # 4 x 64: Llama 4's pixel shuffle feeds its adapter MLP 4 D-wide tokens (intermediate_size wide).
    "intermediate_size": 256,
    "num_heads": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
}


def reduced(target: Target, **fields: int) -> Target:
    """``target`` with its tower at ``REDUCED_WIDTH`` and ``fields`` (a Qwen merger's output width
    is the tiny language model's whatever is asked)."""
    sizes = {**REDUCED_WIDTH, **fields}
    return Target(target.row, target.preset, {k: sizes.get(k, v) for k, v in target.vision.items()})


def same_field(saved, preset) -> bool:
    """A config field as saved equals the preset's (InternVL's configs store sizes as pairs)."""
    pair = (list, tuple)
    return saved == preset or (isinstance(saved, pair) and not isinstance(preset, pair) and list(saved) == [preset] * 2)


def test_every_preset_of_a_vllm_row_is_taken():
    from ipcv_kernels.families import FAMILIES, presets

    assert set(PRESETS) == {name for name, (row, _) in presets().items() if row.id in VLLM_FAMILIES}
    # Every call kind of a vLLM row with presets is among them.
    kinds = {row.kind.name for row in FAMILIES if row.id in VLLM_FAMILIES and row.presets}
    assert {presets()[name][0].kind.name for name in PRESETS} == kinds


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_checkpoint_has_a_processor_of_its_towers_size(preset, tmp_path):
    """Built as bench-vllm builds it (at a reduced width): the tower has the preset's geometry and
    depth (two blocks where the depth is ``num_hidden_layers``: no Qwen tap or window index to
    keep), and the saved processor expands one image's placeholder into exactly as many tokens as
    transformers' model gives the image embeddings, on an image of the preset's default case."""
    import torch

    from ipcv_kernels.bench.vllm.engine import random_image, save_checkpoint
    from ipcv_kernels.bench.vllm.reference import Reference

    target = reduced(target_from_args(argparse.Namespace(preset=preset, family=None)), num_hidden_layers=2)
    checkpoint = save_checkpoint(target, 0, 448 * 448, tmp_path)
    reference = Reference(checkpoint, torch.float32, torch.device("cpu"))
    config = reference.model.config.vision_config
    for key in ("image_size", "patch_size", "depth", "num_hidden_layers", "pooling_kernel_size"):
        if key in target.vision:
            assert same_field(getattr(config, key), target.vision[key]), key
    use = target.row.presets[preset].use
    height, width = map(int, (use.cases[0] if use is not None and use.cases else "336x448").split("x"))
    image = random_image(height, width, 0)
    processor = reference.processor
    ids = processor(text=[processor.image_token], images=[image], return_tensors="pt")["input_ids"]
    # The token the model scatters image features into (Llama 4: each tile's <|patch|> tokens, where its
    # processor's image_token <|image|> marks the global tile once).
    placeholders = int((ids == reference.model.config.image_token_id).sum())
    assert placeholders == reference.features(image).shape[0] > 0
    assert reference.prompt_tokens(image) == ids.shape[-1]
    # The tower's call as the row's call kind counts it (tokens before any merge, newline or tag).
    case = reference.case("case", image)
    assert case.tokens > 0 and reference.calls.flops(case, None).total > 0


# One preset of each call kind besides the Qwen ones (``qwen2-vl-tiny`` above): as bench-vllm runs
# it, at a reduced width, on an image the processor tiles or crops as the real checkpoint's does.
KIND_PRESETS = {
    "llava-next-7b-d8": "336x672",
    "internvit-300m-d8": "448x448",
    "idefics3-8b-d8": "364x364",
    "gemma4-e2b-d8": "336x448",
    "mistral-small-3.1-24b-d8": "224x280",
    "minicpm-v-4.6-d12": "448x448",  # one 448-pixel source slice, no crops
}
# Where a preset refuses prune layer 1: MiniCPM-V prunes after its in-tower merge (insert_layer_id 6).
FIRST_PRUNE_LAYER = {"minicpm-v-4.6-d12": 8}


@pytest.mark.parametrize("preset", list(KIND_PRESETS))
def test_bench_vllm_runs_a_preset_of_every_call_kind(preset, tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "target_from_args", lambda args: reduced(target_from_args(args)))
    argv = ["bench-vllm", "--preset", preset, "--cases", KIND_PRESETS[preset], "--ratio", "0.5"]
    argv += ["--prune-layer", str(FIRST_PRUNE_LAYER.get(preset, 1)), "--as-layers", "1", "--neighbors", "4"]
    argv += ["--repeats", "1", "--warmup", "0"]
    argv += ["--out", str(tmp_path), "--name", "smoke", "--no-progress", "--no-plot"]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "smoke.json").read_text())
    settings = payload["settings"]
    assert settings["model"] == preset
    vision = settings["vision_config"]
    row = target_from_args(argparse.Namespace(preset=preset, family=None)).row
    for key in ("image_size", "patch_size", "num_hidden_layers"):
        if key in row.presets[preset].vision:
            assert same_field(vision[key], row.presets[preset].vision[key]), key
    (case,) = payload["cases"]
    checks = case["checks"]
    assert checks["passed"], checks
    assert checks["ratio0_vs_unpatched"] <= checks["bound"]
    assert checks["ipcv_vs_transformers_same_plan"] <= checks["bound"]
    blocks = case["ipcv_tokens_per_block"]
    assert blocks[0] == case["tokens"] and blocks[-1] < blocks[0]
    assert 0 < case["kept_tokens"] < case["tokens"]
    for measure in MEASURES:
        assert all(case[measure][v]["median_ms"] > 0 for v in VARIANTS)
        assert case[measure]["bound"] > 1.0


def test_build_checkpoint_refuses_a_preset_it_cannot_size(tmp_path):
    from ipcv_kernels.vllm.testing import build_checkpoint

    with pytest.raises(ValueError, match="preset must be one of llava's presets"):
        build_checkpoint(tmp_path, "llava", preset="qwen2-vl-7b-d8")
    with pytest.raises(ValueError, match="vision and preset apply"):
        build_checkpoint(tmp_path, "gemma3", vision={"image_size": 64})
    with pytest.raises(ValueError, match="max_pixels"):
        build_checkpoint(tmp_path, "llava", max_pixels=128 * 128)
    with pytest.raises(TypeError, match="vision"):
        build_checkpoint(tmp_path, "llava", vision=[("image_size", 64)])
