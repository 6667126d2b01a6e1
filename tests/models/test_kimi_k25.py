"""Kimi-K2.5 (MoonViT) beyond the family table's checks (spec §5.10): a video clip is one item and
one attention segment over all its frames, checked against the float64 spec oracle; ratio 0 on a
clip; each frame a part of the selectors' grid, patches row-major; the processor stand-in lays
patches out row-major as Kimi's own processor does; FastV / DART refused on the MLA decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles.towers import ipcv_tower_oracle
from PIL import Image

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, build_tower
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import kimi_k25_pixels
from ipcv_kernels.testing.processors import TinyKimiK25ImageProcessor

ORACLE = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=3)


def clip_call(tower, grid):
    pixels, grid_thw = kimi_k25_pixels(tower.config, grid, dtype=tower.dtype)
    return lambda: tower(pixels, grid_thw=grid_thw)


def test_a_clip_is_one_item_and_one_segment_over_its_frames():
    tower = build_tower("kimi_k25", dtype=torch.float64)
    grid = [[4, 4, 6]]  # one clip of 4 frames (transformers 5.17 cannot mix clips of other t)
    call = clip_call(tower, grid)
    seen = []
    handle = tower.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cu_seqlens"].tolist()), with_kwargs=True
    )
    with torch.no_grad():
        call()
    handle.remove()
    assert seen == [[0, 4 * 4 * 6]]  # the tower's own segments: the whole clip
    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, call, [4 * 4 * 6], **ORACLE)
        with ik.ipcv_applied(tower, ik.IPCVConfig(**ORACLE)) as patched:
            got = call()
            tokens = ik.get_ipcv_patch(patched).last_tokens_per_block
    assert_close(got.pooler_output, expected.output.pooler_output, dtype=torch.float32)
    assert_close(got.last_hidden_state, expected.output.last_hidden_state, dtype=torch.float32)
    kept = int(96 * (1 - 0.6))
    assert tokens == [96, 96] + [kept] * 4


def test_ratio_zero_on_a_clip_equals_the_unpatched_tower():
    tower = build_tower("kimi_k25")
    call = clip_call(tower, [[3, 4, 4]])
    with torch.no_grad():
        expected = call().pooler_output
        with ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4)):
            got = call().pooler_output
    assert got.shape == expected.shape == (4, 4, 64)  # 2 x 2 windows of 4 x 4 patches, pooled over 3 frames
    assert_close(got, expected)


def test_token_grid_makes_each_frame_a_part_row_major():
    tower = build_tower("kimi_k25")
    # Two clips of 2 frames (transformers 5.17 cannot mix clips of other t in one call).
    pixels, grid_thw = kimi_k25_pixels(tower.config, [[2, 2, 4], [2, 2, 2]])
    adapter = ik.families.find_tower(tower)[1]
    grid = adapter.token_grid(tower, (pixels,), {"grid_thw": grid_thw}, {})
    first = [[f, r, c] for f in range(2) for r in range(2) for c in range(4)]
    second = [[2 + f, r, c] for f in range(2) for r in range(2) for c in range(2)]
    assert grid.tolist() == first + second
    # A selector reading the grid runs through it: uniform keeps half of each clip.
    with torch.no_grad(), ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=2, ratio=0.5, selection="uniform")):
        tower(pixels, grid_thw=grid_thw)
        assert ik.get_ipcv_patch(tower).last_tokens_per_block[-1] == 8 + 4


def test_processor_stand_in_lays_patches_out_row_major():
    """For an image whose size needs no resize, the stand-in's patches are Qwen's processor's
    with no merge units (merge size 1, row-major) cut into ``[3, p, p]``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    out = TinyKimiK25ImageProcessor(2)(images=[picture])
    raster = Qwen2VLImageProcessorPil(patch_size=2, merge_size=1, temporal_patch_size=1, min_pixels=4)(
        images=[picture], return_tensors="pt"
    )
    assert out["image_grid_thw"].tolist() == raster["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert torch.equal(out["pixel_values"], raster["pixel_values"].reshape(-1, 3, 2, 2))


@pytest.mark.parametrize("pruner", [ik.FastV(layer=1, ratio=0.5), ik.DART(layer=1, ratio=0.5)], ids=["fastv", "dart"])
def test_llm_pruners_are_refused_on_the_mla_decoder(pruner):
    model = build_model("kimi_k25")
    with pytest.raises(TypeError, match="multi-head latent attention"):
        ik.apply_ipcv(model, llm_pruner=pruner)
    assert ik.get_ipcv_patch(model) is None and ik.get_llm_pruning_patch(model) is None
