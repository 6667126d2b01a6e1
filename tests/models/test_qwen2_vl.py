"""IPCV on a stock Hugging Face Qwen2-VL: equivalence with the unpatched model at ratio 0, with the
independent float64 spec oracle otherwise, scopes, removal, output types and generate."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import check_generate_and_ratio_zero
from oracles.spec import ipcv_oracle

import ipcv_kernels as ik
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import (
    build_qwen2_vl_model,
    build_qwen2_vl_tower,
    qwen2_vl_vision_config,
    sample_pixels,
    vision_inputs,
)

INPUTS = {
    "one_image": [[1, 4, 6]],
    "image_batch": [[1, 4, 6], [1, 6, 4], [1, 2, 2], [1, 4, 4]],
    "video": [[3, 4, 4]],
    "mix": [[1, 4, 6], [2, 4, 4], [1, 2, 4]],
}
CONFIGS = {
    "P1_r50_A0_k1": dict(prune_layer=1, ratio=0.5, as_layers=0, num_neighbors=1),
    "P2_r65_A2_k10": dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=10),
    "P3_r75_A1_k3": dict(prune_layer=3, ratio=0.75, as_layers=1, num_neighbors=3),
    "P1_r30_to_end_k10": dict(prune_layer=1, ratio=0.3, as_layers=99, num_neighbors=10),
    "P5_r90_A0_k2": dict(prune_layer=5, ratio=0.9, as_layers=0, num_neighbors=2),
}


@pytest.fixture(scope="module")
def tower64():
    return build_qwen2_vl_tower(dtype=torch.float64)


def run(tower, grid, config=None, pixels=None):
    sampled, grid_thw = sample_pixels(tower.config, grid, dtype=tower.dtype)
    pixels = sampled if pixels is None else pixels
    with ik.ipcv_applied(tower, config) if config else contextlib.nullcontext(), torch.no_grad():
        return tower(pixels, grid_thw=grid_thw)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("grid", INPUTS.values(), ids=INPUTS.keys())
def test_ratio_zero_equals_unpatched(attn, grid):
    tower = build_qwen2_vl_tower(qwen2_vl_vision_config(attn))
    expected = run(tower, grid)
    got = run(tower, grid, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4))
    assert type(got) is type(expected)
    assert got.pooler_output.shape == expected.pooler_output.shape
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooler_output, expected.pooler_output)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("grid", INPUTS.values(), ids=INPUTS.keys())
def test_matches_float64_spec_oracle(tower64, config, grid):
    got = run(tower64, grid, ik.IPCVConfig(**config))
    pixels, grid_thw = sample_pixels(tower64.config, grid, dtype=torch.float64)
    with torch.no_grad():
        full, merged = ipcv_oracle(tower64, pixels, grid_thw, **config)
    assert_close(got.last_hidden_state, full)
    assert_close(got.pooler_output, merged)


@pytest.mark.parametrize("as_queries", ["kept", "all"])
def test_global_scope_matches_oracle(tower64, as_queries):
    config = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=5)
    grid = INPUTS["mix"]
    got = run(tower64, grid, ik.IPCVConfig(**config, scope="global", as_queries=as_queries))
    pixels, grid_thw = sample_pixels(tower64.config, grid, dtype=torch.float64)
    with torch.no_grad():
        full, _ = ipcv_oracle(tower64, pixels, grid_thw, scope="global", **config)
    assert_close(got.last_hidden_state, full)


def test_global_scope_differs_from_image_scope_on_a_batch(tower64):
    # Counts per item differ: 24+32+8 tokens at ratio 0.6 keep 9+12+3=24 per image, 25 globally.
    config = dict(prune_layer=2, ratio=0.6, as_layers=1, num_neighbors=5)
    ik.apply_ipcv(tower64, ik.IPCVConfig(**config, scope="global"))
    pixels, grid_thw = sample_pixels(tower64.config, INPUTS["mix"], dtype=torch.float64)
    with torch.no_grad():
        tower64(pixels, grid_thw=grid_thw)
    global_tokens = ik.get_ipcv_patch(tower64).last_tokens_per_block
    ik.apply_ipcv(tower64, ik.IPCVConfig(**config, scope="image"))
    with torch.no_grad():
        tower64(pixels, grid_thw=grid_thw)
    image_tokens = ik.get_ipcv_patch(tower64).last_tokens_per_block
    ik.remove_ipcv(tower64)
    assert global_tokens[2:] == [int(64 * 0.4)] * 4
    assert image_tokens[2:] == [9 + 12 + 3] * 4


@pytest.mark.parametrize("as_queries", ["kept", "all"])
def test_image_scope_batch_equals_items_alone(tower64, as_queries):
    config = ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=3, as_queries=as_queries)
    grid = INPUTS["mix"]
    pixels, grid_thw = sample_pixels(tower64.config, grid, dtype=torch.float64)
    batched = run(tower64, grid, config, pixels)
    per_item = pixels.split(grid_thw.prod(-1).tolist())
    alone = [run(tower64, [item], config, item_pixels) for item, item_pixels in zip(grid, per_item, strict=True)]
    assert_close(batched.last_hidden_state, torch.cat([o.last_hidden_state for o in alone]))
    assert_close(batched.pooler_output, torch.cat([o.pooler_output for o in alone]))


def test_paper_formulation_equals_kept_queries(tower64):
    grid = INPUTS["image_batch"]
    kept = run(tower64, grid, ik.IPCVConfig(prune_layer=1, ratio=0.7, as_layers=3, num_neighbors=4))
    paper = run(tower64, grid, ik.IPCVConfig(prune_layer=1, ratio=0.7, as_layers=3, num_neighbors=4, as_queries="all"))
    assert_close(kept.pooler_output, paper.pooler_output)


def test_tokens_per_block_follow_the_config(tower64):
    ik.apply_ipcv(tower64, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=2))
    pixels, grid_thw = sample_pixels(tower64.config, [[1, 4, 6], [1, 2, 4]], dtype=torch.float64)
    with torch.no_grad():
        tower64(pixels, grid_thw=grid_thw)
    assert ik.get_ipcv_patch(tower64).last_tokens_per_block == [32, 32, 16, 16, 16, 16]
    ik.remove_ipcv(tower64)


def test_remove_restores_the_original_forward_exactly():
    tower = build_qwen2_vl_tower()
    originals = [block.forward for block in tower.blocks]
    expected = run(tower, INPUTS["mix"])
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=1, ratio=0.8, as_layers=1, num_neighbors=2))
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=0, num_neighbors=2))  # re-apply replaces
    ik.remove_ipcv(tower)
    assert ik.get_ipcv_patch(tower) is None
    assert [block.forward for block in tower.blocks] == originals
    assert not tower._forward_hooks and not tower._forward_pre_hooks
    got = run(tower, INPUTS["mix"])
    assert torch.equal(got.pooler_output, expected.pooler_output)


def test_only_the_patched_instance_changes():
    first, second = build_qwen2_vl_tower(), build_qwen2_vl_tower()
    expected = run(second, INPUTS["one_image"])
    ik.apply_ipcv(first, ik.IPCVConfig(prune_layer=1, ratio=0.8, as_layers=0, num_neighbors=2))
    pixels, grid_thw = sample_pixels(second.config, INPUTS["one_image"])
    with torch.no_grad():
        assert torch.equal(second(pixels, grid_thw=grid_thw).pooler_output, expected.pooler_output)
    ik.remove_ipcv(first)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_model_generate_and_ratio_zero_logits(attn):
    model = build_qwen2_vl_model(attn_implementation=attn)
    inputs = vision_inputs(model, [[1, 4, 4], [1, 4, 6]])
    check_generate_and_ratio_zero(model, inputs, [40, 40, 13, 13, 13, 13])


def test_base_model_and_video_input():
    model = build_qwen2_vl_model().model  # Qwen2VLModel
    inputs = vision_inputs(model, [[2, 4, 4]], video=True)
    ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=1, ratio=0.5, as_layers=2, num_neighbors=3))
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape[1] == inputs["input_ids"].shape[1]
    assert ik.get_ipcv_patch(model).last_tokens_per_block[1:] == [16] * 5
    ik.remove_ipcv(model)


def test_ipcv_applied_removes_the_patch_even_on_error():
    tower = build_qwen2_vl_tower()
    with pytest.raises(RuntimeError, match="inside"), ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=1)):
        assert ik.get_ipcv_patch(tower) is not None
        raise RuntimeError("inside")
    assert ik.get_ipcv_patch(tower) is None


def test_kept_segments_and_rotary_are_computed_once_per_forward(tower64, monkeypatch):
    # Every pruned block gets the tower's same segment and rotary tensors: the shrink (a host read
    # on CUDA) and the rotary gather must run once per forward, not once per block.
    from ipcv_kernels.engine import vision as engine

    calls = {"unique": 0, "gather": 0}
    unique, gather = torch.unique_consecutive, engine.gather_rotary

    def counting_unique(*args, **kwargs):
        calls["unique"] += 1
        return unique(*args, **kwargs)

    def counting_gather(*args, **kwargs):
        calls["gather"] += 1
        return gather(*args, **kwargs)

    monkeypatch.setattr(torch, "unique_consecutive", counting_unique)
    monkeypatch.setattr(engine, "gather_rotary", counting_gather)
    config = ik.IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2)  # 4 pruned blocks
    pixels, grid_thw = sample_pixels(tower64.config, INPUTS["mix"], dtype=torch.float64)
    with ik.ipcv_applied(tower64, config), torch.no_grad():
        tower64(pixels, grid_thw=grid_thw)
        assert calls == {"unique": 1, "gather": 1}
        tower64(pixels, grid_thw=grid_thw)  # a new forward plans and memoises anew
    assert calls == {"unique": 2, "gather": 2}
