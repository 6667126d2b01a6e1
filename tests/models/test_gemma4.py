"""IPCV on Gemma 4's tower (``Gemma4VisionModel``: a padded batch of patches with 2-D positions,
pooled by position after the blocks), beyond what the family table's tests check: padding rows
pinned and never keys (an image's output does not depend on its padding, pruned or not), the
pooler seeing every row, the frames of a video one item, the encoder patched as vLLM calls it,
the rotary equal to the model's, and LLM-side pruners refused on its decoder."""

from __future__ import annotations

import inspect

import pytest
import torch
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels.engine import IPCVPatch
from ipcv_kernels.families import build_model, build_tower
from ipcv_kernels.models.gemma4 import Gemma4Adapter, axial_rope
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import gemma4_inputs, gemma4_patches

PRUNING = ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
GRIDS = [(6, 8), (10, 6)]  # real patches of two images, padded to 64 rows each
LENGTH = 64


def call(tower, pixels, positions):
    return tower(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state


def test_padding_rows_are_pinned_and_never_keys():
    """Each image of a padded batch gives exactly what it gives alone without padding rows, with
    random values in its padding patches: they are no keys in any block, and they are kept (the
    image's keep count is over its real patches only)."""
    tower = build_tower("gemma4")
    pixels, positions = gemma4_patches(GRIDS, LENGTH)
    noisy = pixels.clone()
    padding = (positions == -1).all(-1)
    noisy[padding] = torch.rand(int(padding.sum()), pixels.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ik.ipcv_applied(tower, PRUNING):
        padded = call(tower, noisy, positions)
        keep = ik.get_ipcv_patch(tower).last_keep
        assert set(padding.reshape(-1).nonzero().flatten().tolist()) <= set(keep.tolist())
        alone = []
        for image, (rows, cols) in enumerate(GRIDS):
            real = rows * cols
            alone.append(call(tower, pixels[image : image + 1, :real], positions[image : image + 1, :real]))
    assert_close(padded, torch.cat(alone))


def test_padding_in_the_oracle_and_pooling_of_every_row():
    """The float64 spec oracle with padding rows pinned and masked as keys; the pooled output
    (the pooler averages 2 x 2 patches by position) comes from the restored rows."""
    tower = build_tower("gemma4", dtype=torch.float64)
    pixels, positions = gemma4_patches(GRIDS, LENGTH, dtype=torch.float64)
    padding = set((positions == -1).all(-1).reshape(-1).nonzero().flatten().tolist())
    config = dict(prune_layer=3, ratio=0.7, as_layers=1, num_neighbors=4)
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            tower,
            lambda: call(tower, pixels, positions),
            [LENGTH, LENGTH],
            pinned=padding,
            key_padding=padding,
            **config,
        )
        with ik.ipcv_applied(tower, ik.IPCVConfig(**config)):
            got = call(tower, pixels, positions)
    assert got.shape == (sum(rows * cols for rows, cols in GRIDS) // 4, tower.config.hidden_size)
    assert_close(got, expected.output, dtype=torch.float32)


def test_frames_of_a_video_are_one_item():
    """``get_video_features`` tells the tower its videos: two frames of 48 real patches at r=0.3
    keep int(96 * 0.7) = 67 real rows together, where two separate items would keep 2 * 33."""
    model = build_model("gemma4")
    pixels, positions = gemma4_patches([(6, 8), (6, 8)], LENGTH, dtype=model.dtype)
    config = ik.IPCVConfig(prune_layer=2, ratio=0.3, as_layers=1, num_neighbors=3)
    padding = 2 * LENGTH - 96
    with torch.no_grad(), ik.ipcv_applied(model, config):
        if "num_frames_per_video" in inspect.signature(model.model.get_video_features).parameters:
            model.model.get_video_features(pixels, positions, num_frames_per_video=torch.tensor([2]))
        else:  # transformers 5.17: [videos, frames, L, C p^2]
            model.model.get_video_features(pixels[None], positions[None])
        assert ik.get_ipcv_patch(model).last_keep.numel() == 67 + padding
        model.model.get_image_features(pixels, positions)  # two images: two items
        assert ik.get_ipcv_patch(model).last_keep.numel() == 2 * 33 + padding


def test_encoder_patched_as_vllm_calls_it_equals_the_tower():
    """vLLM embeds the patches and calls ``vision_tower.encoder`` itself: the encoder patched
    alone gives the last block's output of the patched tower."""
    tower = build_tower("gemma4")
    pixels, positions = gemma4_patches(GRIDS, LENGTH)
    padding = (positions == -1).all(-1)
    captured = []
    handle = tower.encoder.layers[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        with ik.ipcv_applied(tower, PRUNING):
            call(tower, pixels, positions)
        handle.remove()
        patch = IPCVPatch(tower.encoder, Gemma4Adapter(), PRUNING)
        patch.install()
        try:
            embeds = tower.patch_embedder(pixels, positions, padding)
            got = tower.encoder(inputs_embeds=embeds, attention_mask=~padding, pixel_position_ids=positions)
        finally:
            patch.remove()
    assert_close(got.last_hidden_state, captured[0])


def test_axial_rope_equals_the_models():
    from transformers.models.gemma4 import modeling_gemma4

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=generator, dtype=torch.float64)
    positions = torch.randint(0, 9, (2, 7, 2), generator=generator)
    tower = build_tower("gemma4", dtype=torch.float64)
    cos, sin = tower.encoder.rotary_emb(x, positions)
    expected = modeling_gemma4.apply_multidimensional_rope(x, cos, sin, positions)
    got = axial_rope(x.reshape(14, 3, 16), cos.reshape(14, 16), sin.reshape(14, 16))
    torch.testing.assert_close(got, expected.reshape(14, 3, 16), rtol=0, atol=0)


def test_llm_pruners_are_refused_on_its_decoder():
    model = build_model("gemma4")
    for pruner in (ik.FastV(layer=1, ratio=0.5), ik.DART(layer=1, ratio=0.5)):
        with pytest.raises(TypeError, match="per-layer token embeddings"):
            ik.apply_ipcv(model, PRUNING, llm_pruner=pruner)
    assert ik.get_ipcv_patch(model) is None  # refused before touching the model


def test_full_model_generates_with_ipcv():
    model = build_model("gemma4")
    inputs = gemma4_inputs(model, GRIDS)
    with torch.no_grad():
        expected = model(**inputs).logits
        with ik.ipcv_applied(model, PRUNING):
            assert not torch.allclose(model(**inputs).logits, expected)
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert torch.equal(model(**inputs).logits, expected)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
