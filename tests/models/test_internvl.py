"""IPCV on a stock Hugging Face InternVL (InternViT: batched tiles with a CLS token each): the
unpatched model at ratio 0, the float64 spec oracle otherwise (CLS never dropped, tiles of one
image form one item), tile counts read from the prompt by the full model, removal, generate, the
family's default settings and the unsupported-model error."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from oracles.towers import build_model, build_tower, internvl_inputs, internvl_tiles, ipcv_tower_oracle
from torch import nn

import ipcv_kernels as ik
from ipcv_kernels import set_tiles_per_image
from ipcv_kernels.testing import assert_close, assert_close_to_reference

FAMILY = "internvl"
TILE = 17  # CLS + 4 x 4 patches
LAYOUTS = {"one_tile": [1], "one_image_3_tiles": [3], "three_images": [2, 1, 2]}
CONFIGS = {
    "P1_r50_A0_k1": dict(prune_layer=1, ratio=0.5, as_layers=0, num_neighbors=1),
    "P2_r65_A2_k10": dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=10),
    "P3_r90_A1_k3": dict(prune_layer=3, ratio=0.9, as_layers=1, num_neighbors=3),
    "P1_r30_to_end_k4": dict(prune_layer=1, ratio=0.3, as_layers=99, num_neighbors=4),
}


@pytest.fixture(scope="module")
def tower64():
    return build_tower(FAMILY, dtype=torch.float64)


def run(tower, tiles, config=None, tiles_per_image=None):
    if config is not None:
        ik.apply_ipcv(tower, config)
        set_tiles_per_image(tower, tiles_per_image)
    try:
        with torch.no_grad():
            return tower(internvl_tiles(tiles, dtype=tower.dtype))
    finally:
        ik.remove_ipcv(tower)


def oracle(tower, tiles_per_image, config):
    pixels = internvl_tiles(sum(tiles_per_image), dtype=tower.dtype)
    cls_tokens = set(range(0, sum(tiles_per_image) * TILE, TILE))
    items = [count * TILE for count in tiles_per_image]
    with torch.no_grad():
        return ipcv_tower_oracle(tower, lambda: tower(pixels), items, pinned=cls_tokens, **config)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tiles", [1, 3, 5])
def test_ratio_zero_equals_unpatched(attn, tiles):
    tower = build_tower(FAMILY, attn=attn)
    expected = run(tower, tiles)
    got = run(tower, tiles, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4))
    assert type(got) is type(expected)
    assert_close(got.last_hidden_state, expected.last_hidden_state)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_matches_float64_spec_oracle(tower64, config, layout):
    got = run(tower64, sum(layout), ik.IPCVConfig(**config), tiles_per_image=layout)
    expected = oracle(tower64, layout, config)
    assert_close(got.last_hidden_state, expected.output.last_hidden_state)


@pytest.mark.parametrize("as_queries", ["kept", "all"])
def test_bare_tower_call_is_one_item_and_paper_formulation_matches(tower64, as_queries):
    config = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=5)
    got = run(tower64, 5, ik.IPCVConfig(**config, as_queries=as_queries))
    expected = oracle(tower64, [5], config)
    assert_close(got.last_hidden_state, expected.output.last_hidden_state)


def test_cls_tokens_are_kept_and_images_do_not_mix(tower64):
    # 2 + 1 + 2 tiles: 32, 16, 32 patch tokens keep 9, 4, 9 at ratio 0.7, plus the 5 CLS tokens.
    config = ik.IPCVConfig(prune_layer=2, ratio=0.7, as_layers=1, num_neighbors=3)
    pixels = internvl_tiles(5, dtype=torch.float64)
    ik.apply_ipcv(tower64, config)
    set_tiles_per_image(tower64, [2, 1, 2])
    with torch.no_grad():
        batched = tower64(pixels).last_hidden_state
        tokens = ik.get_ipcv_patch(tower64).last_tokens_per_block
        set_tiles_per_image(tower64, None)
        alone = [tower64(tiles).last_hidden_state for tiles in pixels.split([2, 1, 2])]
    ik.remove_ipcv(tower64)
    assert tokens == [85, 85, 27, 27, 27, 27]
    assert_close(batched, torch.cat(alone))


def test_tile_counts_must_match_the_call(tower64):
    ik.apply_ipcv(tower64, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=2))
    set_tiles_per_image(tower64, [2, 2])
    with pytest.raises(ValueError, match="tiles_per_image"), torch.no_grad():
        tower64(internvl_tiles(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="tiles_per_image"):
        set_tiles_per_image(tower64, [2, 0])
    ik.remove_ipcv(tower64)
    with pytest.raises(TypeError, match="patched"):
        set_tiles_per_image(tower64, [3])


def test_remove_restores_the_original_forward_exactly():
    tower = build_tower(FAMILY)
    originals = [layer.forward for layer in tower.encoder.layer]
    expected = run(tower, 3)
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=1, ratio=0.8, as_layers=1, num_neighbors=2))
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=0, num_neighbors=2))
    ik.remove_ipcv(tower)
    assert [layer.forward for layer in tower.encoder.layer] == originals
    assert not tower._forward_hooks and not tower._forward_pre_hooks
    assert torch.equal(run(tower, 3).last_hidden_state, expected.last_hidden_state)


def test_full_model_reads_tiles_per_image_from_the_prompt_and_generates():
    model = build_model(FAMILY)
    inputs = internvl_inputs(model, [2, 1])
    tower = model.model.vision_tower
    with torch.no_grad():
        expected = model(**inputs).logits
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=1, num_neighbors=3))
        assert_close(model(**inputs).logits, expected)

        config = ik.IPCVConfig(prune_layer=2, ratio=0.7, as_layers=1, num_neighbors=3)
        ik.apply_ipcv(model, config)
        seen = []
        hook = tower.register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state))
        model(**inputs)
        hook.remove()
        # 32 and 16 patch tokens keep 9 and 4 (one item of 48 would keep 14), plus 3 CLS tokens.
        assert ik.get_ipcv_patch(model).last_tokens_per_block[2:] == [16] * 4
        ik.apply_ipcv(tower, config)
        set_tiles_per_image(tower, [2, 1])
        assert_close(seen[0], tower(inputs["pixel_values"]).last_hidden_state)

        # generate, whose images recent transformers encode before the prefill forward, splits the
        # tiles by image too: its first token's logits are the patched forward's.
        ik.apply_ipcv(model, config)
        patched = model(**inputs).logits[:, -1]
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert_close(out.logits[0], patched)
    ik.remove_ipcv(model)
    assert not model.model._forward_hooks and not model.model._forward_pre_hooks
    assert "generate" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_family_default_settings():
    tower = build_tower(FAMILY)
    assert ik.recommended_config(tower) == ik.IPCVConfig(prune_layer=7, ratio=0.65, as_layers=3, num_neighbors=10)
    assert ik.recommended_config(tower, ratio=0.5).ratio == 0.5
    assert ik.recommended_config(build_tower("qwen2_5_vl")) == ik.IPCVConfig()


def test_apply_without_config_uses_the_family_defaults():
    # The tiny tower has 6 layers, fewer than InternVL's default prune layer 7: the refusal shows
    # which default apply_ipcv chose, where a Qwen tower of the same depth takes its own (P = 3).
    with pytest.raises(ValueError, match="prune_layer must be in \\[1, 6\\), got 7"):
        ik.apply_ipcv(build_tower(FAMILY))
    qwen = build_tower("qwen2_5_vl")
    ik.apply_ipcv(qwen)
    assert ik.get_ipcv_patch(qwen).config == ik.IPCVConfig()
    ik.remove_ipcv(qwen)


def test_unsupported_model_lists_the_families():
    with pytest.raises(TypeError, match=r"Qwen2-VL.*Qwen2\.5-VL.*Qwen3-VL.*InternVL") as error:
        ik.apply_ipcv(nn.Linear(2, 2))
    assert "InternVLForConditionalGeneration" in str(error.value)


@pytest.mark.parametrize("layer", [-3, 2])
def test_feature_layer_inside_the_pruned_stretch_reads_the_restored_sequence(layer):
    # -3 is layer 3's output, inside the pruned stretch from P = 2: it is restored, not kept rows;
    # 2 is layer 1's output, before P. The layers after the read one are skipped.
    model = build_model(FAMILY, dtype=torch.float64)
    kwargs = {"vision_feature_layer": layer}
    inputs = internvl_inputs(model, [2, 1])
    config = dict(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=2)
    items, cls_tokens = [2 * TILE, TILE], {0, TILE, 2 * TILE}
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            model.model.vision_tower, lambda: model(**inputs, **kwargs), items, pinned=cls_tokens, **config
        ).output.logits
        with ik.ipcv_applied(model, ik.IPCVConfig(**config)):
            got = model(**inputs, **kwargs).logits
    assert_close(got, expected)


def backend_outputs(tower, layout, device, dtype, backends):
    pixels = internvl_tiles(sum(layout)).to(device, dtype)
    outputs = []
    for backend in backends:
        config = ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=3, ops_backend=backend)
        ik.apply_ipcv(tower, replace(config, attention_backend=backend))
        set_tiles_per_image(tower, layout)
        with torch.no_grad():
            outputs.append(tower(pixels).last_hidden_state)
        ik.remove_ipcv(tower)
    return outputs


def test_triton_path_equals_reference_path(triton_backends):
    tower = build_tower(FAMILY).to(triton_backends)
    assert_close(*backend_outputs(tower, [2, 1], triton_backends, torch.float32, ("auto", "torch")))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_auto_is_as_close_to_fp64_as_pytorch(cuda_device, dtype):
    # auto vs the fp64 tower, relative to the reference path's error in the same dtype.
    tower = build_tower(FAMILY, dtype=dtype).to(cuda_device)
    layout = [3, 1, 2]
    (auto,) = backend_outputs(tower, layout, cuda_device, dtype, ("auto",))
    (same_dtype,) = backend_outputs(tower, layout, cuda_device, dtype, ("torch",))
    (expected,) = backend_outputs(copy.deepcopy(tower).double(), layout, cuda_device, torch.float64, ("torch",))
    assert_close_to_reference(auto, expected, same_dtype)


@pytest.mark.parametrize("config", list(CONFIGS.values())[:3], ids=list(CONFIGS)[:3])
def test_authors_scope_matches_the_authors_rule(tower64, config):
    # scope="authors": selection per tile (CLS kept, not counted), neighbours from every kept row
    # of the call, CLS tokens included, as the paper authors' InternVL code does.
    pixels = internvl_tiles(5, dtype=tower64.dtype)
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            tower64,
            lambda: tower64(pixels),
            [TILE] * 5,
            pinned=set(range(0, 5 * TILE, TILE)),
            neighbors_from_call=True,
            **config,
        )
        got = run(tower64, 5, ik.IPCVConfig(**config, scope="authors"), tiles_per_image=[2, 3])
    assert_close(got.last_hidden_state, expected.output.last_hidden_state)


def test_authors_scope_differs_from_the_package_default(tower64):
    config = dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=3)
    ours = run(tower64, 3, ik.IPCVConfig(**config), tiles_per_image=[3])
    authors = run(tower64, 3, ik.IPCVConfig(**config, scope="authors"), tiles_per_image=[3])
    assert not torch.allclose(ours.last_hidden_state, authors.last_hidden_state)
