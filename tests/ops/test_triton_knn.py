"""The Triton ``knn`` kernel against the fp64 reference (CPU under ``TRITON_INTERPRET=1``, or CUDA).

Neighbour indices are compared through their exact distances (ties may be broken either way),
the ``-1`` padding exactly, and segment membership explicitly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

pytest.importorskip("triton")

from ipcv_kernels.reference import knn_reference
from ipcv_kernels.testing import assert_close
from ipcv_kernels.triton.knn import MAX_KERNEL_K, knn_triton


def neighbour_distances(query: torch.Tensor, ref: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exact fp64 squared distances of the chosen neighbours; 0 in ``-1`` slots."""
    q, r = query.double(), ref.double()
    picked = r[index.clamp_min(0)]
    dist = ((picked - q[:, None, :]) ** 2).sum(-1)
    return torch.where(index >= 0, dist, torch.zeros_like(dist))


def check_against_reference(got, query, ref, k, cu_query=None, cu_ref=None):
    expected = knn_reference(query.double(), ref.double(), k, cu_query, cu_ref)
    assert got.dtype == torch.int64 and got.shape == (query.shape[0], k)
    got, cpu_q, cpu_r = got.cpu(), query.cpu(), ref.cpu()
    torch.testing.assert_close(got == -1, expected == -1)
    if cu_query is not None:
        seg = torch.searchsorted(cu_query.cpu(), torch.arange(query.shape[0], dtype=torch.int32), right=True) - 1
        lo, hi = cu_ref.cpu()[seg].long(), cu_ref.cpu()[seg + 1].long()
        valid = got >= 0
        assert bool(((got >= lo[:, None]) & (got < hi[:, None]) | ~valid).all()), "a neighbour crossed its segment"
    d_got = neighbour_distances(cpu_q, cpu_r, got)
    # Distances are computed in fp32 from the inputs' values: the fp32 row of the table applies.
    assert_close(d_got, neighbour_distances(cpu_q, cpu_r, expected), dtype=torch.float32)
    # Nearest first.
    assert bool((d_got[:, 1:] >= d_got[:, :-1] - 1e-4 * d_got[:, 1:].abs() - 1e-4)[got[:, 1:] >= 0].all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segments_with_empty_one_token_and_short_ref_sets(triton_device, dtype):
    torch.manual_seed(0)
    cu_query, cu_ref = offsets([7, 0, 1, 13, 5, 3], triton_device), offsets([3, 4, 1, 40, 0, 2], triton_device)
    query = torch.randn(29, 20, device=triton_device).to(dtype)
    ref = torch.randn(50, 20, device=triton_device).to(dtype)
    got = knn_triton(query, ref, 5, cu_query, cu_ref)
    check_against_reference(got, query, ref, 5, cu_query, cu_ref)


@pytest.mark.parametrize("k", [1, 10, MAX_KERNEL_K])
def test_many_ref_tiles_and_feature_chunks(triton_device, k):
    # 150 refs: three ref tiles; D = 72: two feature chunks, the second partial.
    torch.manual_seed(k)
    query = torch.randn(70, 72, device=triton_device)
    ref = torch.randn(150, 72, device=triton_device)
    check_against_reference(knn_triton(query, ref, k), query, ref, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_query_tile_straddling_segments(triton_device, dtype):
    # Query tiles are 32 rows (fp32) or 128 rows (16-bit): segment 0 has one row more than a tile,
    # so the first tile ends inside it and the second mixes both; every row must still see only
    # its own refs.
    tile = 32 if dtype == torch.float32 else 128
    torch.manual_seed(1)
    cu_query, cu_ref = offsets([tile + 1, 4], triton_device), offsets([70, 90], triton_device)
    query = torch.randn(tile + 5, 16, device=triton_device).to(dtype)
    ref = torch.randn(160, 16, device=triton_device).to(dtype)
    check_against_reference(knn_triton(query, ref, 10, cu_query, cu_ref), query, ref, 10, cu_query, cu_ref)


def test_non_contiguous_inputs(triton_device):
    torch.manual_seed(2)
    query = torch.randn(24, 2, 17, device=triton_device)[:, 1]  # row stride 34
    ref = torch.randn(17, 40, device=triton_device).T  # feature stride 40
    check_against_reference(knn_triton(query, ref, 6), query, ref, 6)


def test_empty_inputs_and_large_k_fallback(triton_device):
    query = torch.randn(5, 8, device=triton_device)
    assert knn_triton(query[:0], query, 3).shape == (0, 3)
    assert knn_triton(query, query[:0], 3).eq(-1).all()
    ref = torch.randn(40, 8, device=triton_device)
    check_against_reference(knn_triton(query, ref, MAX_KERNEL_K + 1), query, ref, MAX_KERNEL_K + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_large_segments(cuda_device, dtype):
    torch.manual_seed(3)
    cu_query, cu_ref = offsets([2600, 700, 1], cuda_device), offsets([1400, 380, 9], cuda_device)
    query = torch.randn(3301, 1280, device=cuda_device).to(dtype)
    ref = torch.randn(1789, 1280, device=cuda_device).to(dtype)
    check_against_reference(knn_triton(query, ref, 10, cu_query, cu_ref), query, ref, 10, cu_query, cu_ref)
