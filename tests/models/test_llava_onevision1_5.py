"""LLaVA-OneVision-1.5 (RICE-ViT) beyond the family table's checks (spec §5.12): the CLS row before
every frame is pinned (kept, not counted, never a neighbour), a video is one item whose frames are
segments of their own, checked against the float64 spec oracle; the selectors' grid puts every CLS
row off the grid; FastV runs on its Qwen3 decoder; the fidelity tool scores the tower's output rows
(CLS rows dropped). Skipped where transformers has no ``llava_onevision1_5`` (5.17, 5.19)."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "transformers.models.llava_onevision1_5",
    reason="this transformers has no llava_onevision1_5 (added after 5.19)",
)

import torch
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, build_tower, find_tower
from ipcv_kernels.fidelity.evaluate import patch_rows
from ipcv_kernels.testing import assert_close

ORACLE = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=3)


def call_of(tower, grid, seed=0):
    p = tower.config.patch_size
    generator = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grid)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * p * p, generator=generator).to(tower.dtype)
    return lambda: tower(pixels, grid_thw=grid_thw)


def test_cls_rows_are_pinned_and_a_video_is_one_item():
    tower = build_tower("llava_onevision1_5", dtype=torch.float64)
    grid = [[1, 4, 4], [3, 4, 6]]  # an image, then a video of 3 frames
    call = call_of(tower, grid)
    frames = [17, 25, 25, 25]
    cls = [0, 17, 42, 67]
    seen = []
    handle = tower.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    with torch.no_grad():
        call()
    handle.remove()
    assert seen == [[0, 17, 42, 67, 92]]  # the tower's segments: one per frame, its CLS row first
    items = [17, 75]
    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, call, items, pinned=set(cls), **ORACLE)
        with ik.ipcv_applied(tower, ik.IPCVConfig(**ORACLE)) as patched:
            got = call()
            patch = ik.get_ipcv_patch(patched)
            keep, tokens = patch.last_keep, patch.last_tokens_per_block
    assert_close(got.pooler_output, expected.output.pooler_output, dtype=torch.float32)
    assert set(cls) <= set(keep.tolist())
    # Each item keeps its share of its patches (CLS rows not counted), plus its CLS rows.
    kept = int(16 * (1 - 0.6)) + 1 + int(72 * (1 - 0.6)) + 3
    assert tokens == [sum(frames)] * 2 + [kept] * 4


def test_no_cls_row_is_a_neighbour():
    tower = build_tower("llava_onevision1_5")
    call = call_of(tower, [[1, 4, 6], [2, 4, 4]])
    adapter = find_tower(tower)[1]
    planned = []
    plan_of = adapter.plan

    def plan(*args, **kwargs):
        planned.append(plan_of(*args, **kwargs))
        return planned[-1]

    with torch.no_grad(), ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=2, ratio=0.7, num_neighbors=8)):
        ik.get_ipcv_patch(tower).adapter.plan = plan
        call()
    (result,) = planned
    cls_in_keep = torch.searchsorted(result.keep, torch.tensor([0, 25, 42]))
    assert torch.equal(result.keep[cls_in_keep], torch.tensor([0, 25, 42]))
    assert not torch.isin(result.neighbors, cls_in_keep).any()
    assert (result.neighbors >= 0).any()


def test_ratio_zero_on_a_video_equals_the_unpatched_tower():
    tower = build_tower("llava_onevision1_5")
    call = call_of(tower, [[2, 4, 4]], seed=1)
    with torch.no_grad():
        expected = call().pooler_output
        with ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4)):
            got = call().pooler_output
    assert_close(got, expected)


def test_token_grid_puts_each_cls_row_off_the_grid():
    tower = build_tower("llava_onevision1_5")
    grid_thw = torch.tensor([[1, 2, 2], [2, 2, 2]])
    pixels = torch.zeros(12, 12)
    grid = find_tower(tower)[1].token_grid(tower, (pixels,), {"grid_thw": grid_thw}, {})
    frame = [[0, 0], [0, 1], [1, 0], [1, 1]]  # one 2 x 2 merge unit
    expected = []
    for part in range(3):
        expected += [[-1, -1, -1], *[[part, r, c] for r, c in frame]]
    assert grid.tolist() == expected
    with torch.no_grad(), ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=2, ratio=0.5, selection="uniform")):
        tower(pixels, grid_thw=grid_thw)
        assert ik.get_ipcv_patch(tower).last_tokens_per_block[-1] == (2 + 1) + (4 + 2)


def test_fidelity_scores_the_output_rows():
    # Frames of 5 rows (CLS + 4 patches): block rows 0, 5, 10 are CLS; output rows are patches only.
    keep = torch.tensor([0, 2, 4, 5, 6, 10, 13])
    assert patch_rows(keep, torch.tensor([[1, 2, 2], [2, 2, 2]])).tolist() == [1, 3, 4, 10]


def test_fastv_runs_on_the_qwen3_decoder():
    from ipcv_kernels.families import family

    model = build_model("llava_onevision1_5")
    inputs = family("llava_onevision1_5").tiny_model.prompt(model, 2, 0)
    with torch.no_grad():
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2, ratio=0.5), llm_pruner=ik.FastV(layer=1, ratio=0.5))
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert ik.get_llm_pruning_patch(model).last_kept is not None
