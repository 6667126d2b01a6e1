"""A patched model is as re-entrant as the unpatched one, and its patches stack with other
libraries' wrappers of the same modules.

- Two threads hammering one patched tower (same-size and different-size inputs, every family)
  get exactly what the same calls give one after the other.
- A forward that raises half-way leaves the next forward correct.
- A forward wrapper another library set on a block (or decoder layer) before ``apply_ipcv`` is
  wrapped and put back on removal; one set after ``apply_ipcv`` survives ``remove_ipcv``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from oracles.serial import hammer, last_state
from oracles.towers import build_model, build_tower, internvl_inputs, internvl_tiles, tower_call

import ipcv_kernels as ik
from ipcv_kernels.testing.models import (
    build_qwen2_vl_model,
    build_qwen2_vl_tower,
    clip_family_inputs,
    clip_pixels,
    sample_pixels,
    vision_inputs,
)

CONFIG = ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
# Grids of the same total size (a plan of one call would fit the other's tensors) and of another.
SAME_SIZE = ([[1, 4, 6]], [[1, 6, 4]])
OTHER_SIZE = ([[1, 4, 6]], [[2, 4, 4], [1, 2, 4]])


def qwen_calls(family: str, grids) -> tuple[torch.nn.Module, list[Callable[[], object]]]:
    tower = build_qwen2_vl_tower() if family == "qwen2_vl" else build_tower(family)
    calls = []
    for seed, grid in enumerate(grids):
        pixels, grid_thw = sample_pixels(tower.config, grid, dtype=tower.dtype, seed=seed)
        calls.append(lambda p=pixels, g=grid_thw: tower(p, grid_thw=g))
    return tower, calls


def internvl_calls(tile_counts) -> tuple[torch.nn.Module, list[Callable[[], object]]]:
    tower = build_tower("internvl")
    tiles = [internvl_tiles(count, seed=seed) for seed, count in enumerate(tile_counts)]
    return tower, [lambda t=t: tower(pixel_values=t) for t in tiles]


@pytest.mark.parametrize("grids", [SAME_SIZE, OTHER_SIZE], ids=["same_size", "other_size"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_concurrent_calls_of_one_patched_qwen_tower(family, grids):
    tower, calls = qwen_calls(family, grids)
    ik.apply_ipcv(tower, CONFIG)
    hammer(calls)


@pytest.mark.parametrize("tiles", [(2, 2), (1, 3)], ids=["same_size", "other_size"])
def test_concurrent_calls_of_one_patched_internvl_tower(tiles):
    tower, calls = internvl_calls(tiles)
    ik.apply_ipcv(tower, CONFIG)
    hammer(calls)


@pytest.mark.parametrize("images", [(2, 2), (1, 3)], ids=["same_size", "other_size"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_concurrent_calls_of_one_patched_clip_tower(family, images):
    tower = build_tower(family)
    batches = [clip_pixels(count, seed=seed) for seed, count in enumerate(images)]
    ik.apply_ipcv(tower, CONFIG)
    hammer([lambda b=b: tower(b) for b in batches])


def test_concurrent_llava_calls_read_their_own_feature_layers():
    model = build_model("llava")
    ik.apply_ipcv(model, CONFIG)
    prompts = [clip_family_inputs(model, 1, seed=0), clip_family_inputs(model, 2, seed=1)]
    hammer([lambda inputs=inputs: model(**inputs).logits for inputs in prompts])


def test_concurrent_full_model_calls_keep_their_own_items_and_llm_pruning():
    # InternVL: each call's tiles per image come from its own prompt, and the LLM-side pruner's
    # per-forward state belongs to each call.
    model = build_model("internvl")
    ik.apply_ipcv(model, CONFIG, llm_pruner=ik.FastV(layer=1, ratio=0.5))
    prompts = [internvl_inputs(model, [1, 2], seed=0), internvl_inputs(model, [2, 1], seed=1)]
    hammer([lambda inputs=inputs: model(**inputs).logits for inputs in prompts])


def test_concurrent_llm_pruning_on_qwen2_vl():
    model = build_qwen2_vl_model()
    ik.apply_ipcv(model, CONFIG, llm_pruner=ik.DART(layer=1, ratio=0.5))
    prompts = [vision_inputs(model, [[1, 4, 4]], seed=0), vision_inputs(model, [[1, 4, 6]], seed=1)]
    hammer([lambda inputs=inputs: model(**inputs).logits for inputs in prompts])


class Fault(RuntimeError):
    pass


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_a_forward_that_raises_half_way_leaves_the_next_one_correct(family):
    if family == "internvl":
        tower, (call,) = internvl_calls([3])
        block = tower.encoder.layer[3]
    else:
        tower, (call,) = qwen_calls(family, [[[1, 4, 6]]])
        block = tower.blocks[3]
    ik.apply_ipcv(tower, CONFIG)
    with torch.no_grad():
        expected = last_state(call())

    def fail(*args, **kwargs):
        raise Fault("injected")

    handle = block.mlp.register_forward_pre_hook(fail)  # block 3: a pruned block, mid-forward
    with pytest.raises(Fault), torch.no_grad():
        call()
    handle.remove()
    assert ik.get_ipcv_patch(tower).state is None
    with torch.no_grad():
        assert torch.equal(last_state(call()), expected)


def foreign_wrapper(module: torch.nn.Module, log: list[str]) -> Callable[..., object]:
    """What another library's per-instance patch does: wrap whatever forward the instance has."""
    inner = module.forward

    def forward(*args, **kwargs):
        log.append("foreign")
        return inner(*args, **kwargs)

    module.forward = forward
    return forward


def qwen_tower_and_call():
    tower = build_qwen2_vl_tower()
    return tower, tower_call(tower, [[1, 4, 6]])


def test_foreign_wrapper_set_before_apply_is_wrapped_and_put_back():
    tower, call = qwen_tower_and_call()
    with torch.no_grad():
        unpatched = last_state(call())
    log: list[str] = []
    wrapper = foreign_wrapper(tower.blocks[4], log)
    ik.apply_ipcv(tower, CONFIG)
    with torch.no_grad():
        patched = last_state(call())
    assert log == ["foreign"]  # IPCV's wrapper calls the foreign one
    ik.remove_ipcv(tower)
    assert vars(tower.blocks[4])["forward"] is wrapper
    assert all("forward" not in vars(block) for index, block in enumerate(tower.blocks) if index != 4)
    assert "forward" not in vars(tower)
    with torch.no_grad():
        assert torch.equal(last_state(call()), unpatched)
    assert log == ["foreign", "foreign"]
    ik.apply_ipcv(tower, CONFIG)
    with torch.no_grad():
        assert torch.equal(last_state(call()), patched)


def test_foreign_wrapper_set_after_apply_survives_remove():
    tower, call = qwen_tower_and_call()
    with torch.no_grad():
        unpatched = last_state(call())
    ik.apply_ipcv(tower, CONFIG)
    log: list[str] = []
    wrapper = foreign_wrapper(tower.blocks[4], log)
    ik.remove_ipcv(tower)
    assert vars(tower.blocks[4])["forward"] is wrapper  # not dropped with IPCV's
    with torch.no_grad():
        assert torch.equal(last_state(call()), unpatched)  # IPCV's wrapper inside is a pass-through
    assert log == ["foreign"]


@pytest.mark.parametrize("order", ["foreign_first", "ipcv_first"])
def test_foreign_decoder_layer_wrapper_and_llm_pruner(order):
    model = build_qwen2_vl_model()
    inputs = vision_inputs(model, [[1, 4, 4]])
    layer = model.model.language_model.layers[1]
    with torch.no_grad():
        unpatched = model(**inputs).logits
    log: list[str] = []
    if order == "foreign_first":
        wrapper = foreign_wrapper(layer, log)
    ik.apply_ipcv(model, CONFIG, llm_pruner=ik.FastV(layer=1, ratio=0.5))
    if order == "ipcv_first":
        wrapper = foreign_wrapper(layer, log)
    with torch.no_grad():
        model(**inputs)
    assert log == ["foreign"]
    ik.remove_ipcv(model)
    assert vars(layer)["forward"] is wrapper
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, unpatched)
