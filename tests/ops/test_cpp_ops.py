"""The compiled ops of ``csrc/`` (``torch.ops.ipcv.*``, backend ``"cpp"``) against the references.

Selection and the kept offsets are compared exactly (scores are built well separated, so there are
no ties). Neighbours are compared through their exact fp64 distances (ties may be broken either
way), and by index exactly on the rows where the reference's distances have no near-tie.
CUDA cases are marked ``gpu`` and skip cleanly without a device or without CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

import ipcv_kernels as ik
from ipcv_kernels.ops import backend_for, cpp_backend, dispatch
from ipcv_kernels.reference import (
    keep_counts,
    knn_reference,
    ngr_reconstruct_reference,
    plan_reference,
    select_tokens_reference,
)
from ipcv_kernels.testing import assert_close, assert_close_to_reference, tolerance
from ipcv_kernels.testing.models import build_qwen2_vl_tower, sample_pixels

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


@pytest.fixture
def cpp():
    """The loaded extension (skips when this install has none)."""
    if cpp_backend.UNAVAILABLE_REASON is not None:
        pytest.skip(cpp_backend.UNAVAILABLE_REASON)
    return torch.ops.ipcv


@pytest.fixture
def cuda_cpp(cpp, cuda_device):
    if not cpp_backend.has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    return cuda_device


def plan_inputs(items: list[int], dim: int, dtype: torch.dtype, seed: int = 0):
    """x_before, x_after whose scores ||x_after - x_before|| are all distinct by >= 1% (no ties)."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(items)
    direction = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    magnitude = 1.0 + 0.1 * torch.randperm(n, generator=generator).to(torch.float64)
    x_before = 0.1 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    x_after = x_before + direction * magnitude[:, None]
    return x_before.to(dtype), x_after.to(dtype)


def neighbour_distances(query: torch.Tensor, ref: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exact fp64 squared distances of the chosen neighbours; 0 in ``-1`` slots."""
    q, r = query.double(), ref.double()
    chosen = r[index.clamp_min(0)]
    dist = ((q[:, None, :] - chosen) ** 2).sum(-1)
    return torch.where(index >= 0, dist, torch.zeros_like(dist))


def assert_same_neighbours(got, expected, query, ref, acc_dtype):
    """Same -1 slots; same distances within the accumulation dtype's tolerance; same indices on rows
    whose reference distances (k + 1 nearest) are separated by more than that tolerance."""
    assert got.shape == expected.shape and got.dtype == torch.int64
    assert torch.equal(got < 0, expected < 0)
    d_got = neighbour_distances(query, ref, got)
    d_ref = neighbour_distances(query, ref, expected)
    assert_close(d_got, d_ref, dtype=acc_dtype)
    tol = tolerance(acc_dtype)
    gaps = d_ref.diff(dim=1)
    separated = ((gaps > tol.atol + tol.rtol * d_ref[:, 1:]) | (expected[:, 1:] < 0)).all(1)
    assert torch.equal(got[separated], expected[separated])


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_plan(got, expected, x_after, k):
    for name in ("keep", "drop", "cu_keep", "cu_drop", "cu_seqlens_kept"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.neighbors.shape == (expected.drop.shape[0], k)
    query, ref = x_after[expected.drop], x_after[expected.keep]
    assert_same_neighbours(got.neighbors, expected.neighbors, query, ref, acc_dtype_of(x_after.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_plan_matches_reference(cpp, layout, dtype):
    items, segments = layout
    x_before, x_after = plan_inputs(items, 40, dtype)
    cu_items, cu_seqlens = offsets(items), offsets(segments)
    threads = torch.get_num_threads()
    try:
        # The kernel makes one work unit per item or per query tile depending on items per thread.
        for num_threads in sorted({1, threads}):
            torch.set_num_threads(num_threads)
            for ratio, k in ((0.65, 10), (0.3, 3), (0.9, 1)):
                expected = plan_reference(x_before, x_after, cu_items, cu_seqlens, ratio, k)
                counts = keep_counts(cu_items, ratio)
                got = ik.IPCVPlan(*cpp.plan(x_before, x_after, cu_items, cu_seqlens, counts, k))
                check_plan(got, expected, x_after, k)
    finally:
        torch.set_num_threads(threads)


def test_plan_ratio_zero_keeps_everything(cpp):
    x_before, x_after = plan_inputs([9, 4], 8, torch.float32)
    counts = keep_counts(offsets([9, 4]), 0.0)
    plan = ik.IPCVPlan(*cpp.plan(x_before, x_after, offsets([9, 4]), offsets([5, 4, 4]), counts, 3))
    assert torch.equal(plan.keep, torch.arange(13))
    assert plan.drop.numel() == 0 and plan.neighbors.shape == (0, 3)
    assert plan.cu_seqlens_kept.tolist() == [0, 5, 9, 13]


def test_public_ops_auto_pick_cpp_and_match(cpp):
    device = torch.device("cpu")
    assert backend_for("plan", "auto", device) == "cpp"
    x_before, x_after = plan_inputs([30, 50], 24, torch.float32)
    args = (x_before, x_after, offsets([30, 50]), offsets([30, 25, 25]), 0.65, 4)
    check_plan(ik.plan_ipcv(*args, backend="cpp"), ik.plan_ipcv(*args, backend="torch"), x_after, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_knn_matches_reference(cpp, dtype):
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(300, 48, generator=generator).to(dtype)
    ref = torch.randn(2600, 48, generator=generator).to(dtype)
    # Segments: several query tiles against > 1024 refs, an empty query segment, refs fewer than k.
    cu_query, cu_ref = offsets([150, 0, 140, 10]), offsets([1500, 5, 1092, 3])
    for k in (1, 8, 40):
        expected = knn_reference(query, ref, k, cu_query, cu_ref)
        got = cpp.knn(query, ref, k, cu_query, cu_ref)
        assert_same_neighbours(got, expected, query, ref, acc_dtype_of(dtype))
    expected = knn_reference(query, ref, 5)
    assert_same_neighbours(cpp.knn(query, ref, 5), expected, query, ref, acc_dtype_of(dtype))


def test_knn_exact_indices_without_ties(cpp):
    # Each query is a slightly moved copy of one ref row: its nearest neighbour is that row.
    generator = torch.Generator().manual_seed(2)
    ref = torch.randn(500, 64, generator=generator)
    pick = torch.randperm(500, generator=generator)[:120]
    query = ref[pick] + 1e-3 * torch.randn(120, 64, generator=generator)
    assert torch.equal(cpp.knn(query, ref, 1)[:, 0], pick)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_tokens_matches_reference(cpp, dtype):
    generator = torch.Generator().manual_seed(3)
    items = [37, 0, 1, 5, 300]
    scores = (1.0 + 0.01 * torch.randperm(sum(items), generator=generator).double()).to(dtype)
    cu_items = offsets(items)
    for ratio in (0.0, 0.5, 0.65, 0.99):
        expected = select_tokens_reference(scores, cu_items, ratio)
        got = cpp.select_tokens(scores, cu_items, keep_counts(cu_items, ratio))
        for name, a, b in zip(expected._fields, got, expected, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ngr_reconstruct_matches_reference(cpp, dtype, index_dtype):
    generator = torch.Generator().manual_seed(4)
    base_drop, kept, base_kept = (torch.randn(n, 72, generator=generator, dtype=torch.float64) for n in (30, 12, 12))
    neighbors = torch.randint(-1, 12, (30, 5), generator=generator)
    neighbors[3] = -1  # a row with no valid neighbour keeps base_drop
    neighbors = neighbors.to(index_dtype)
    inputs = [t.to(dtype) for t in (base_drop, kept, base_kept)]
    got = cpp.ngr_reconstruct(*inputs, neighbors)
    assert got.dtype == dtype and got.shape == base_drop.shape
    expected64 = ngr_reconstruct_reference(*(t.double() for t in inputs), neighbors)
    assert_close_to_reference(got, expected64, ngr_reconstruct_reference(*inputs, neighbors))
    assert torch.equal(got[3], inputs[0][3])


def test_ngr_reconstruct_empty_inputs(cpp):
    got = cpp.ngr_reconstruct(torch.randn(0, 8), torch.randn(0, 8), torch.randn(0, 8), torch.empty(0, 3).long())
    assert got.shape == (0, 8)


def test_boundary_checks_name_the_argument(cpp):
    x, cu = torch.randn(6, 4), offsets([6])
    counts = keep_counts(cu, 0.5)
    cases = [
        (lambda: cpp.knn(x.long(), x, 2), "query must be fp16/bf16/fp32/fp64"),
        (lambda: cpp.knn(x, torch.randn(6, 5), 2), "ref must have 4 columns"),
        (lambda: cpp.knn(x, x, 0), "k must be >= 1"),
        (lambda: cpp.knn(x, x, 2, cu, None), "given together"),
        (lambda: cpp.knn(x, x, 2, cu.long(), cu), "cu_query must be int32"),
        (lambda: cpp.knn(x, x, 2, torch.tensor([0, 4, 2, 6], dtype=torch.int32), offsets([2, 2, 2])), "non-decreasing"),
        (lambda: cpp.knn(x, x, 2, offsets([5]), cu), "must end at the number of rows"),
        (lambda: cpp.ngr_reconstruct(x, x, x, torch.full((6, 2), 6)), r"neighbors must be in \[-1, 6\)"),
        (lambda: cpp.ngr_reconstruct(x, x, x[:3], torch.zeros(6, 2).long()), "base_kept must have the shape"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([7])), r"keep_counts must be in \[0, item length\]"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([3, 3])), "one count per item"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([3], dtype=torch.int32)), "keep_counts must be int64"),
        (lambda: cpp.plan(x, x.double(), cu, cu, counts, 2), "x_before must have the dtype"),
        (lambda: cpp.plan(x, x, cu, cu, counts, 0), "num_neighbors must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_missing_extension_raises_clear_error(monkeypatch):
    monkeypatch.setattr(cpp_backend, "UNAVAILABLE_REASON", "the compiled extension is not available; build it")
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # resolutions cached while it was available
    x_before, x_after = plan_inputs([8], 4, torch.float32)
    assert backend_for("plan", "auto", torch.device("cpu")) != "cpp"
    with pytest.raises(RuntimeError, match=r"backend 'cpp' of plan is not available.*build it"):
        ik.plan_ipcv(x_before, x_after, offsets([8]), offsets([8]), 0.5, 2, backend="cpp")


# The ops are inference-only and register no autograd formula; inputs need no grad.
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_cases(device: torch.device):
    generator = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    cu_a, cu_b = offsets([3, 0, 4], device), offsets([5, 2, 6], device)
    neighbors = torch.tensor([[0, 2], [1, -1], [-1, -1], [3, 0]], device=device)
    x_before, x_after = (t.to(device) for t in plan_inputs([5, 2, 6], 8, torch.float32))
    return {
        "knn": (torch.ops.ipcv.knn, (randn(7, 8), randn(13, 8), 3, cu_a, cu_b)),
        "ngr_reconstruct": (torch.ops.ipcv.ngr_reconstruct, (randn(4, 8), randn(5, 8), randn(5, 8), neighbors)),
        "select_tokens": (torch.ops.ipcv.select_tokens, (randn(13), cu_b, keep_counts(cu_b, 0.5))),
        "plan": (
            torch.ops.ipcv.plan,
            (x_before, x_after, cu_b, offsets([3, 2, 2, 6], device), keep_counts(cu_b, 0.5), 2),
        ),
    }


@pytest.mark.parametrize("name", ["knn", "ngr_reconstruct", "select_tokens", "plan"])
def test_opcheck(cpp, name):
    op, args = opcheck_cases(torch.device("cpu"))[name]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def test_qwen2_vl_uses_cpp_plan_and_matches_torch_backend(cpp):
    tower = build_qwen2_vl_tower(dtype=torch.float64)
    pixels, grid_thw = sample_pixels(tower.config, [[1, 4, 6], [2, 4, 4], [1, 2, 4]], dtype=torch.float64)
    outputs = {}
    for backend in ("cpp", "torch"):
        ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=4, backend=backend))
        try:
            with torch.no_grad():
                outputs[backend] = tower(pixels, grid_thw=grid_thw)
        finally:
            ik.remove_ipcv(tower)
    assert_close(outputs["cpp"].last_hidden_state, outputs["torch"].last_hidden_state)
    assert_close(outputs["cpp"].pooler_output, outputs["torch"].pooler_output)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ops_match_reference(cuda_cpp, dtype):
    device = cuda_cpp
    items, segments = LAYOUTS["mixed_items"]
    x_before, x_after = plan_inputs(items, 40, dtype)
    cu_items, cu_seqlens = offsets(items), offsets(segments)
    expected = plan_reference(x_before, x_after, cu_items, cu_seqlens, 0.65, 10)
    got = torch.ops.ipcv.plan(
        x_before.to(device),
        x_after.to(device),
        cu_items.to(device),
        cu_seqlens.to(device),
        keep_counts(cu_items, 0.65),
        10,
    )
    check_plan(ik.IPCVPlan(*(t.cpu() for t in got)), expected, x_after, 10)

    generator = torch.Generator().manual_seed(6)
    query, ref = (torch.randn(n, 48, generator=generator).to(dtype) for n in (300, 5000))
    cu_query, cu_ref = offsets([150, 0, 150]), offsets([4500, 5, 495])
    for k in (1, 10, 40):  # 40: above the warp-held list, the ATen topk merge
        got = torch.ops.ipcv.knn(query.to(device), ref.to(device), k, cu_query.to(device), cu_ref.to(device))
        expected = knn_reference(query, ref, k, cu_query, cu_ref)
        assert_same_neighbours(got.cpu(), expected, query, ref, acc_dtype_of(dtype))

    scores = (1.0 + 0.01 * torch.randperm(400, generator=generator).double()).to(dtype)
    counts = keep_counts(offsets([100, 0, 300]), 0.65)
    selection = torch.ops.ipcv.select_tokens(scores.to(device), offsets([100, 0, 300], device), counts)
    for a, b in zip(selection, select_tokens_reference(scores, offsets([100, 0, 300]), 0.65), strict=True):
        assert torch.equal(a.cpu(), b)

    base_drop, kept, base_kept = (torch.randn(n, 72, generator=generator).to(dtype) for n in (30, 12, 12))
    neighbors = torch.randint(-1, 12, (30, 5), generator=generator)
    got = torch.ops.ipcv.ngr_reconstruct(*(t.to(device) for t in (base_drop, kept, base_kept, neighbors)))
    expected64 = ngr_reconstruct_reference(base_drop.double(), kept.double(), base_kept.double(), neighbors)
    assert_close_to_reference(got.cpu(), expected64, ngr_reconstruct_reference(base_drop, kept, base_kept, neighbors))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["knn", "ngr_reconstruct", "select_tokens", "plan"])
def test_opcheck_cuda(cuda_cpp, name):
    op, args = opcheck_cases(cuda_cpp)[name]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
