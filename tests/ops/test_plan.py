"""``plan_ipcv`` on every backend (``conftest.BACKENDS``) against the reference: a hand-checked case,
item and segment layouts (empty and one-token items, fewer kept tokens than k, several tiles,
video frames finer than items), dtypes, ratios, thread counts, ratio 0; and a patched tower with
each backend as ``IPCVConfig.ops_backend``.

Selection and the kept offsets are compared exactly (scores are built well separated, so there are
no ties); neighbours through their exact fp64 distances, and by index where the reference's
distances have no near-tie.
"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets, on_cuda
from neighbours import acc_dtype_of, assert_same_neighbours

import ipcv_kernels as ik
from ipcv_kernels.ops import backend_names
from ipcv_kernels.reference import plan_reference
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import build_qwen2_vl_tower, sample_pixels

OP = "plan"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (item lengths, attention segment lengths): empty items, one-token items, items with fewer kept
# tokens than k, several query/reference tiles (> 64 dropped, > 1024 kept rows), and attention
# segments finer than items (video frames).
LAYOUTS = {
    "one_item": ([97], [97]),
    "mixed_items": ([37, 0, 1, 5, 64], [37, 0, 1, 5, 32, 32]),
    "video_frames": ([48, 24], [16, 16, 16, 8, 8, 8]),
    "tiles": ([1700], [1700]),
    # Enough items for one work unit per item (>= 4 per thread) at 1 to 3 threads.
    "many_items": ([13, 0, 1, 29, 7, 40, 3, 2, 90, 11, 5, 17], [13, 0, 1, 29, 7, 40, 3, 2, 45, 45, 11, 5, 17]),
}
# What ``IPCVConfig.ops_backend`` names: one backend for every planning op of the engine.
PLANNING_OPS = ("plan", "select_tokens", "knn", "ngr_reconstruct", "ngr_restore")


def plan_inputs(items: list[int], dim: int, dtype: torch.dtype, seed: int = 0):
    """x_before, x_after whose scores ||x_after - x_before|| are all distinct by >= 1% (no ties)."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(items)
    direction = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    magnitude = 1.0 + 0.1 * torch.randperm(n, generator=generator).to(torch.float64)
    x_before = 0.1 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    x_after = x_before + direction * magnitude[:, None]
    return x_before.to(dtype), x_after.to(dtype)


def check_plan(got, expected, x_after, k):
    for name in ("keep", "drop", "cu_keep", "cu_drop", "cu_seqlens_kept"):
        assert torch.equal(getattr(got, name).cpu(), getattr(expected, name).cpu()), name
    assert got.neighbors.shape == (expected.drop.shape[0], k)
    x_after = x_after.cpu()
    query, ref = x_after[expected.drop.cpu()], x_after[expected.keep.cpu()]
    assert_same_neighbours(got.neighbors, expected.neighbors, query, ref, acc_dtype_of(x_after.dtype))


def test_selection_then_neighbours_within_items(backend):
    torch.manual_seed(0)
    before, after = torch.randn(12, 4, device=backend.device), torch.randn(12, 4, device=backend.device)
    cu_items, cu_seqlens = offsets([5, 7], backend.device), offsets([5, 3, 4], backend.device)
    plan = ik.plan_ipcv(before, after, cu_items, cu_seqlens, 0.5, 10, backend=backend.name)
    sel = ik.select_tokens(ik.token_scores(before, after), cu_items, 0.5, backend="torch")
    assert torch.equal(plan.keep, sel.keep) and torch.equal(plan.drop, sel.drop)
    # Item 0 keeps 2, so its dropped tokens get exactly 2 valid neighbours, both inside item 0.
    assert plan.cu_keep.tolist() == [0, 2, 5]
    item0 = plan.neighbors[: int(plan.cu_drop[1])]
    assert (item0[:, :2] >= 0).all() and (item0[:, :2] < 2).all() and (item0[:, 2:] == -1).all()
    item1 = plan.neighbors[int(plan.cu_drop[1]) :]
    assert (item1[:, :3] >= 2).all() and (item1[:, 3:] == -1).all()
    assert plan.cu_seqlens_kept.tolist() == ik.shrink_cu_seqlens(cu_seqlens, plan.keep).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_matches_reference(backend, layout, dtype):
    items, segments = layout
    x_before, x_after = plan_inputs(items, 40, dtype)
    cu_items, cu_seqlens = offsets(items), offsets(segments)
    on = [t.to(backend.device) for t in (x_before, x_after, cu_items, cu_seqlens)]
    threads = torch.get_num_threads()
    try:
        # The compiled kernel makes one work unit per item or per query tile depending on items per thread.
        for num_threads in sorted({1, threads}):
            torch.set_num_threads(num_threads)
            for ratio, k in ((0.65, 10), (0.3, 3), (0.9, 1)):
                expected = plan_reference(x_before, x_after, cu_items, cu_seqlens, ratio, k)
                check_plan(ik.plan_ipcv(*on, ratio, k, backend=backend.name), expected, x_after, k)
    finally:
        torch.set_num_threads(threads)


def test_ratio_zero_keeps_everything(backend):
    x_before, x_after = (t.to(backend.device) for t in plan_inputs([9, 4], 8, torch.float32))
    cu_items, cu_seqlens = offsets([9, 4], backend.device), offsets([5, 4, 4], backend.device)
    plan = ik.plan_ipcv(x_before, x_after, cu_items, cu_seqlens, 0.0, 3, backend=backend.name)
    assert torch.equal(plan.keep.cpu(), torch.arange(13))
    assert plan.drop.numel() == 0 and plan.neighbors.shape == (0, 3)
    assert plan.cu_seqlens_kept.tolist() == [0, 5, 9, 13]


def test_patched_tower_matches_torch_backend(backend):
    missing = [op for op in PLANNING_OPS if backend.name not in backend_names(op)]
    if missing:
        pytest.skip(f"IPCVConfig.ops_backend names one backend for {PLANNING_OPS}; {backend.name!r} has no {missing}")
    tower = build_qwen2_vl_tower(dtype=torch.float64, device=backend.device)
    pixels, grid_thw = sample_pixels(tower.config, [[1, 4, 6], [2, 4, 4], [1, 2, 4]], dtype=torch.float64)
    outputs = {}
    for name in (backend.name, "torch"):
        ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=4, ops_backend=name))
        try:
            with torch.no_grad():
                outputs[name] = tower(pixels.to(backend.device), grid_thw=grid_thw)
        finally:
            ik.remove_ipcv(tower)
    assert_close(outputs[backend.name].last_hidden_state, outputs["torch"].last_hidden_state)
    assert_close(outputs[backend.name].pooler_output, outputs["torch"].pooler_output)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(backend, dtype):
    device = on_cuda(backend)
    items, segments = LAYOUTS["mixed_items"]
    x_before, x_after = plan_inputs(items, 40, dtype)
    cu_items, cu_seqlens = offsets(items), offsets(segments)
    expected = plan_reference(x_before, x_after, cu_items, cu_seqlens, 0.65, 10)
    on = [t.to(device) for t in (x_before, x_after, cu_items, cu_seqlens)]
    check_plan(ik.plan_ipcv(*on, 0.65, 10, backend=backend.name), expected, x_after, 10)
