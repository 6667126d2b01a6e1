"""The vision-tower benchmark on every family: tiny towers through the bench's checks, the FLOP
bounds of ``ipcv_kernels.flops``, checkpoints found through the family table, the real-shape presets."""

from __future__ import annotations

import json

import pytest
import torch
from oracles.rows import row_params

from ipcv_kernels import families
from ipcv_kernels.__main__ import main
from ipcv_kernels.api import get_ipcv_patch
from ipcv_kernels.bench import progress
from ipcv_kernels.bench.calls import GridCalls, ImageCalls, PatchCalls, SliceCalls, TileCalls, tower_calls
from ipcv_kernels.bench.towers import build_tower, load_vision_tower, model_use, vision_config_from_preset
from ipcv_kernels.bench.variants import VARIANTS, variant_configs
from ipcv_kernels.bench.vit import Bench, run_case
from ipcv_kernels.config import IPCVConfig
from ipcv_kernels.families import ModelUse, Preset, family, find_family, presets
from ipcv_kernels.families.row import IMAGES, PATCHES, SLICES
from ipcv_kernels.flops import (
    clip_vit_flops,
    gemma4_flops,
    idefics3_flops,
    internvl_flops,
    llama4_flops,
    predicted_speedup,
    qwen2_5_vl_flops,
    qwen2_vl_flops,
    qwen3_vl_flops,
)
from ipcv_kernels.reference import keep_count
from ipcv_kernels.testing import models

CONFIG = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=2, num_neighbors=4)
# Per tower kind: cases in pixels (Qwen: 2-pixel patches; the others: one tile or crop of the
# tower's image size per 16 / 32 pixels) and the FLOP function of flops.py that must bound it.
CASES = {
    "qwen2_vl": ("8x8", "8x16*2", "8x8@4"),
    "qwen2_5_vl": ("8x8", "8x16*2", "8x8@4"),
    "qwen3_vl": ("8x8", "8x16*2", "8x8@4"),
    "internvl": ("16x16", "32x32*2"),
    "gemma4": ("32x32", "32x48*2"),  # 64 real patches; 48 real and 16 padding rows (the budget: 64)
    "kimi_k25": ("8x8", "8x16*2", "8x8@4"),
    "mistral3": ("16x16", "16x24*2"),  # Pixtral: 4-pixel patches, images at their own size
    "llava_onevision1_5": ("8x8", "8x16*2", "8x8@4"),
    "minicpmv": ("16x16", "16x24*2"),  # MiniCPM-V: 2-pixel patches, slices in 4-patch multiples
}
TILE_CASES = ("32x32", "64x64*2")


def expected_flops(kind, calls, case, config):
    config_ = calls.config
    qwen = {"qwen2_vl": qwen2_vl_flops, "qwen2_5_vl": qwen2_5_vl_flops, "qwen3_vl": qwen3_vl_flops}
    if kind in qwen:
        return qwen[kind](config_, case.grid_thw, config)
    if families.family(kind).kind.flops_shape == "grid_thw":  # a later grid_thw family: its row's FLOP model
        return families.family(kind).flops(config_, case.grid_thw, config)
    if kind == "internvl":
        return internvl_flops(config_, case.tiles_per_image, config, image_size=tuple(config_.image_size))
    if kind == "gemma4":  # (padded length, real patches) per image
        return gemma4_flops(config_, [(case.tile_tokens, r * c) for r, c in case.tile_real], config)
    if kind == "llama4":  # tiles with a CLS each, and the pixel-shuffle adapter
        return llama4_flops(config_, case.tiles_per_image, config)
    if kind in ("idefics3", "smolvlm"):  # sub-images without padding (32-pixel multiples)
        return idefics3_flops(config_, [[0] * tiles for tiles in case.tiles_per_image], config)
    return clip_vit_flops(config_, case.tiles_per_image, config)


@pytest.mark.parametrize("kind", row_params(families.BUILT_TOWERS))
def test_every_family_tiny_tower_passes_the_checks_and_is_bounded_by_flops_py(kind):
    tower = families.build_tower(kind)
    calls = tower_calls(tower)
    row = family(kind)
    expected = (
        GridCalls
        if row.kind.takes_grid_thw
        else PatchCalls
        if row.kind is PATCHES
        else ImageCalls
        if row.kind is IMAGES
        else SliceCalls
        if row.kind is SLICES
        else TileCalls
    )
    assert isinstance(calls, expected)
    bench = Bench(tower, calls, torch.device("cpu"), torch.float32, variant_configs(CONFIG, VARIANTS))
    with progress.Progress(0, "test", enabled=False) as bar:
        grid = families.family(kind).kind.takes_grid_thw
        for index, text in enumerate(CASES.get(kind, CASES["qwen2_vl"] if grid else TILE_CASES)):
            case = calls.parse_case(text)
            result = run_case(bench, case, VARIANTS, warmup=1, repeats=1, check_ratio_zero=True, seed=index, bar=bar)
            checks = result["checks"]
            assert checks["passed"] and checks["ratio0_vs_unpatched"] <= checks["bound"], (text, checks)
            unpatched = expected_flops(kind, calls, case, None)
            ipcv = expected_flops(kind, calls, case, bench.configs["ipcv"])
            assert result["bound_ipcv"] == predicted_speedup(unpatched, ipcv)
            assert result["variants"]["ipcv"]["gflops"] == ipcv.total / 1e9
            # The tower kept what the FLOP model counts (pinned CLS tokens included in the rows).
            assert result["ipcv_tokens_per_block"][-1] == result["kept_tokens"] == ipcv.kept_tokens
            assert result["tokens"] == unpatched.tokens == case.tokens


def test_tile_towers_group_the_tiles_of_an_image_into_one_item():
    tower = families.build_tower("internvl")  # 16-pixel tiles of 16 patches + CLS
    calls = tower_calls(tower)
    case = calls.parse_case("32x48*2")
    assert (case.kind, case.tiles_per_image, case.tile_tokens, case.tokens) == ("batch", (6, 6), 17, 204)
    from ipcv_kernels.api import apply_ipcv

    apply_ipcv(tower, CONFIG)
    calls.forward(calls.inputs(case, 0, torch.device("cpu"), torch.float32))
    # 6 tiles x 16 patches per image, half kept, plus the 6 pinned CLS tokens of each image.
    assert get_ipcv_patch(tower).last_tokens_per_block[-1] == 2 * (48 + 6)
    with pytest.raises(ValueError, match="videos"):
        calls.parse_case("32x32@4")
    clip = tower_calls(families.build_tower("clip"))
    assert clip.parse_case("32x32").tokens == 17 and clip.default_cases() == ("32x32",)


@pytest.mark.parametrize("family", row_params(families.BUILT_FAMILIES))
def test_model_flag_loads_the_tower_of_every_family_through_the_family_table(family, tmp_path):
    model = families.build_model(family)
    model.save_pretrained(tmp_path)
    tower = load_vision_tower(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    _, expected = find_family(model)
    assert type(tower) is type(expected)
    reference = expected.state_dict()
    loaded = tower.state_dict()
    assert set(loaded) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    tower_calls(tower)  # a tower the benchmark can call
    # ... as its full model calls it, with that model's family (LLaVA's, not its CLIP tower's).
    calls = tower_calls(tower, model_use(tmp_path))
    assert calls.model_family is find_family(model)[0]


def test_bare_tower_checkpoint_and_recommended_setting_through_the_cli(tmp_path):
    families.build_tower("internvl").save_pretrained(tmp_path / "tower")
    argv = ["bench", "--model", str(tmp_path / "tower"), "--recommended", "--prune-layer", "2", "--device", "cpu"]
    argv += ["--repeats", "1", "--warmup", "1", "--out", str(tmp_path), "--name", "t", "--no-plot", "--no-progress"]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "t.json").read_text())
    settings = payload["settings"]
    assert settings["family"] == "InternVL" and settings["cases"] == ["16x16"]  # native resolution
    recommended = find_family(families.build_tower("internvl"))[0].recommended
    assert settings["ipcv"]["as_layers"] == recommended["as_layers"] and settings["ipcv"]["prune_layer"] == 2
    (case,) = payload["cases"]
    assert case["checks"]["passed"] and case["tiles_per_image"] == [1] and case["tokens"] == 17
    with pytest.raises(ValueError, match="Qwen towers only"):
        main([*argv, "--breakdown"])


# Real shapes: (tokens of one image at native resolution, tokens per image the tower sees).
PRESET_TOKENS = {
    "clip-vit-l-336-d8": 577,
    "siglip-so400m-d8": 4096,
    "siglip-so400m-384-d8": 729,
    "internvit-300m-d8": 1025,
    "internvit-300m": 1025,
    "llava-1.5-7b": 577,
    "llava-next-7b-d8": 5 * 577,  # 672x672: the base crop and 2 x 2 crops of 336
    "llava-onevision-7b-d8": 5 * 729,  # 768x768: the base crop and 2 x 2 crops of 384
    "idefics3-8b-d8": 5 * 676,  # 728x700: 2 x 2 sub-images of 364 and the global one
    "llama4-scout": 577,  # one 336-pixel tile: 24 x 24 patches and the CLS token
    "llama4-scout-d8": 577,
    "gemma4-e2b": 2520,  # 768x768: a row of 280 soft tokens of 3 x 3 patches of 16 pixels
    "gemma4-e2b-d8": 2520,
}


@pytest.mark.parametrize(
    "name", row_params((name, presets()[name][1].tower or presets()[name][0].id) for name in sorted(presets()))
)
def test_family_presets_build_with_their_real_shapes(name):
    config = vision_config_from_preset(name)
    tower = build_tower(config, dtype=torch.float32, device=torch.device("meta"))
    row, preset = presets()[name]
    calls = tower_calls(tower, preset.use)
    assert calls.family is find_family(tower)[0] and calls.model_family is row
    width = getattr(config, "embed_dim", None) or config.hidden_size  # Qwen2-VL's hidden_size is its output
    assert width in (64, 640, 768, 1024, 1152, 1280, 1408, 1536)
    if name in PRESET_TOKENS:
        (case,) = [calls.parse_case(text) for text in calls.default_cases()]
        assert case.tokens == PRESET_TOKENS[name]
        assert calls.depth == preset.vision["num_hidden_layers"]
        report = calls.flops(case, IPCVConfig(**calls.family.recommended))
        assert report.kept_tokens < case.tokens
    else:
        assert calls.parse_case("448x448").tokens > 0


def test_model_uses_of_the_presets():
    # LLaVA-1.5: block 22 of 24 read, block 23 counted nowhere; the padded Idefics3 sub-images.
    llava = tower_calls(
        build_tower(vision_config_from_preset("llava-1.5-7b"), dtype=torch.float32, device=torch.device("meta")),
        presets()["llava-1.5-7b"][1].use,
    )
    assert llava.read == (22,) and "block 23 runs neither" in llava.reading()
    (case,) = [llava.parse_case(text) for text in llava.default_cases()]
    assert len(llava.flops(case, IPCVConfig()).blocks) == 23
    idefics3 = tower_calls(
        build_tower(vision_config_from_preset("idefics3-8b-d8"), dtype=torch.float32, device=torch.device("meta")),
        presets()["idefics3-8b-d8"][1].use,
    )
    (case,) = [idefics3.parse_case(text) for text in idefics3.default_cases()]
    # 700 - 364 = 336 pixels: 24 of 26 patch columns real in the right-hand sub-images.
    assert case.tile_padding == (0, 2 * 26, 0, 2 * 26, 0) and idefics3.reading() is None
    report = idefics3.flops(case, IPCVConfig())
    assert report.kept_tokens == 2 * 52 + keep_count(5 * 676 - 2 * 52, IPCVConfig().ratio)
    with pytest.raises(ValueError, match="use"):
        tower_calls(families.build_tower("idefics3"), ModelUse("x", feature_layer=-2))
    with pytest.raises(ValueError, match="use"):
        tower_calls(families.build_tower("qwen2_5_vl"), ModelUse("x", feature_layer=-2))


def test_unpatched_tower_read_at_the_feature_layer_is_the_models_feature():
    # The baseline leaves out the blocks after the read one: its output is hidden_states[-2].
    model = families.build_model("llava")
    tower = find_family(model)[1]
    calls = tower_calls(tower, ModelUse("LLaVA", feature_layer=-2))
    inputs = calls.inputs(calls.parse_case("64x32"), 0, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = tower(inputs[1][0], output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(calls.forward(inputs), expected, rtol=0, atol=0)
    assert len(calls.blocks) == calls.depth  # every block is back


def _bench(tmp_path, source, *extra):
    argv = ["bench", *source, "--recommended", "--prune-layer", "2", "--device", "cpu", "--repeats", "1"]
    argv += ["--warmup", "1", "--out", str(tmp_path), "--name", "t", "--no-plot", "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((tmp_path / "t.json").read_text())


@pytest.mark.parametrize(
    ("family", "case", "crops", "read"),
    [
        ("llava", "32x32", [1], (4,)),  # vision_feature_layer -2 of 6 blocks: block 4
        ("llava_next", "64x64", [5], (4,)),  # the base crop and 2 x 2 crops, one item
        ("llava_onevision", "32x64", [3], (5,)),  # the base crop and 1 x 2 crops; layer -1
    ],
)
def test_full_checkpoints_are_timed_as_their_model_calls_the_tower(family, case, crops, read, tmp_path):
    model = families.build_model(family)
    model.save_pretrained(tmp_path / "model")
    use = model_use(tmp_path / "model")
    assert use.feature_layer == model.config.vision_feature_layer
    payload = _bench(tmp_path, ["--model", str(tmp_path / "model")], "--cases", case)
    settings, (result,) = payload["settings"], payload["cases"]
    assert settings["reads"].startswith(use.model) and settings["model_use"]["feature_layer"] == use.feature_layer
    assert result["checks"]["passed"] and result["tiles_per_image"] == crops
    # The crops as the model counts them (anyres_crops: its own image_size_to_num_patches).
    if use.grid_pinpoints is not None:
        from ipcv_kernels.models.clip_vit import anyres_crops

        height, width = (int(v) for v in case.split("x"))
        assert anyres_crops(model.model, torch.tensor([[height, width]]), None) == crops
    # Blocks past the read one are not run, and the bound is the FLOP model of the blocks read.
    assert len(result["ipcv_tokens_per_block"]) == max(read) + 1
    tower = load_vision_tower(tmp_path / "model", dtype=torch.float32, device=torch.device("cpu"))
    calls = tower_calls(tower, use)
    parsed = calls.parse_case(case)
    config = IPCVConfig(**settings["ipcv"])
    unpatched, ipcv = (clip_vit_flops(tower.config, crops, c, read_blocks=read) for c in (None, config))
    assert (
        result["bound_ipcv"]
        == predicted_speedup(unpatched, ipcv)
        == predicted_speedup(calls.flops(parsed, None), calls.flops(parsed, config))
    )
    assert "As the full model calls the tower: " in (tmp_path / "t.md").read_text()


def test_sub_image_preset_with_padding_passes_the_checks(tmp_path, monkeypatch):
    # The tiny Idefics3 tower's shape as a preset: a 64x56 image is 2 x 2 sub-images (the right
    # column padded, 3 of 4 patch columns real) and the global one, one item.
    monkeypatch.setitem(family("idefics3").presets, "idefics3-8b-d8", Preset(dict(models.IDEFICS3_VISION)))
    payload = _bench(tmp_path, ["--preset", "idefics3-8b-d8"], "--cases", "64x56", "32x32*2", "--check", "all")
    first, second = payload["cases"]
    assert payload["settings"]["family"] == "Idefics3" and payload["settings"]["reads"] is None
    assert first["checks"]["passed"] and second["checks"]["passed"]
    assert first["tiles_per_image"] == [5] and first["padding_patches"] == [0, 4, 0, 4, 0]
    assert first["ipcv_tokens_per_block"][-1] == first["kept_tokens"] == 8 + keep_count(80 - 8, 0.65)
    assert second["tiles_per_image"] == [1, 1] and "padding_patches" not in second
