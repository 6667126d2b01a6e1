"""``knn`` on every backend (``conftest.BACKENDS``): hand-computed cases, segments and tiles, dtypes,
strided inputs and fallbacks, against the fp64 reference.

Neighbour indices are compared through their exact distances (ties may be broken either way), the
``-1`` padding exactly, segment membership explicitly, and indices exactly where the reference's
distances have no near-tie.
"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets, on_cuda, skip_unsupported
from neighbours import acc_dtype_of, assert_same_neighbours, check_against_reference

import ipcv_kernels as ik
from ipcv_kernels.reference import knn_reference

OP = "knn"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# The Triton kernel's longest running top-k list (``ipcv_kernels.triton.knn.MAX_KERNEL_K``); larger
# k falls back to the reference there. Every backend runs the cases around it.
MAX_KERNEL_K = 32


def test_hand_case_on_a_line(backend):
    # Points on a line: nearest neighbours are obvious and tie-free.
    ref = torch.tensor([[0.0], [10.0], [3.0], [7.0]], device=backend.device)
    query = torch.tensor([[2.9], [9.0], [6.0]], device=backend.device)
    got = ik.knn(query, ref, 2, backend=backend.name)
    assert got.tolist() == [[2, 0], [1, 3], [3, 2]]
    assert got.dtype == torch.int64


def test_segments_never_cross_and_pad_with_minus_one(backend):
    device = backend.device
    ref = torch.tensor([[0.0], [1.0], [100.0], [101.0], [102.0]], device=device)
    query = torch.tensor([[100.4], [0.2], [101.6], [5.0]], device=device)
    cu_query, cu_ref = offsets([1, 3, 0], device), offsets([2, 0, 3], device)
    # Segment 0 (query 100.4) may only see refs 0,1; segment 1 has no refs; segment 2 no queries.
    got = ik.knn(query, ref, 3, cu_query, cu_ref, backend=backend.name)
    assert got.tolist() == [[1, 0, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]


def test_one_token_segments(backend):
    device = backend.device
    ref = torch.tensor([[1.0, 1.0], [5.0, 5.0]], device=device)
    query = torch.tensor([[0.0, 0.0], [9.0, 9.0]], device=device)
    got = ik.knn(query, ref, 4, offsets([1, 1], device), offsets([1, 1], device), backend=backend.name)
    assert got.tolist() == [[0, -1, -1, -1], [1, -1, -1, -1]]


def test_empty_query(backend):
    got = ik.knn(
        torch.empty(0, 3, device=backend.device), torch.randn(4, 3, device=backend.device), 2, backend=backend.name
    )
    assert got.shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segments_with_empty_one_token_and_short_ref_sets(backend, dtype):
    device = backend.device
    torch.manual_seed(0)
    cu_query, cu_ref = offsets([7, 0, 1, 13, 5, 3], device), offsets([3, 4, 1, 40, 0, 2], device)
    query = torch.randn(29, 20, device=device).to(dtype)
    ref = torch.randn(50, 20, device=device).to(dtype)
    got = ik.knn(query, ref, 5, cu_query, cu_ref, backend=backend.name)
    check_against_reference(got, query, ref, 5, cu_query, cu_ref)


@pytest.mark.parametrize("k", [1, 10, MAX_KERNEL_K])
def test_many_ref_tiles_and_feature_chunks(backend, k):
    # 150 refs: three ref tiles; D = 72: two feature chunks, the second partial.
    torch.manual_seed(k)
    query = torch.randn(70, 72, device=backend.device)
    ref = torch.randn(150, 72, device=backend.device)
    check_against_reference(ik.knn(query, ref, k, backend=backend.name), query, ref, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_query_tile_straddling_segments(backend, dtype):
    # Triton's query tiles are 32 rows (fp32) or 128 rows (16-bit): segment 0 has one row more than
    # a tile, so the first tile ends inside it and the second mixes both; every row must still see
    # only its own refs.
    device = backend.device
    tile = 32 if dtype == torch.float32 else 128
    torch.manual_seed(1)
    cu_query, cu_ref = offsets([tile + 1, 4], device), offsets([70, 90], device)
    query = torch.randn(tile + 5, 16, device=device).to(dtype)
    ref = torch.randn(160, 16, device=device).to(dtype)
    got = ik.knn(query, ref, 10, cu_query, cu_ref, backend=backend.name)
    check_against_reference(got, query, ref, 10, cu_query, cu_ref)


def test_non_contiguous_inputs(backend):
    torch.manual_seed(2)
    query = torch.randn(24, 2, 17, device=backend.device)[:, 1]  # row stride 34
    ref = torch.randn(17, 40, device=backend.device).T  # feature stride 40
    check_against_reference(ik.knn(query, ref, 6, backend=backend.name), query, ref, 6)


def test_empty_inputs_and_large_k_fallback(backend):
    query = torch.randn(5, 8, device=backend.device)
    assert ik.knn(query[:0], query, 3, backend=backend.name).shape == (0, 3)
    assert ik.knn(query, query[:0], 3, backend=backend.name).eq(-1).all()
    ref = torch.randn(40, 8, device=backend.device)
    got = ik.knn(query, ref, MAX_KERNEL_K + 1, backend=backend.name)
    check_against_reference(got, query, ref, MAX_KERNEL_K + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_across_tiles_and_dtypes(backend, dtype):
    skip_unsupported(backend, dtype)
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(300, 48, generator=generator).to(dtype)
    ref = torch.randn(2600, 48, generator=generator).to(dtype)
    # Segments: several query tiles against > 1024 refs, an empty query segment, refs fewer than k.
    cu_query, cu_ref = offsets([150, 0, 140, 10]), offsets([1500, 5, 1092, 3])
    on = [t.to(backend.device) for t in (query, ref, cu_query, cu_ref)]
    for k in (1, 8, 40):
        expected = knn_reference(query, ref, k, cu_query, cu_ref)
        got = ik.knn(*on[:2], k, *on[2:], backend=backend.name)
        assert_same_neighbours(got, expected, query, ref, acc_dtype_of(dtype))
    expected = knn_reference(query, ref, 5)
    assert_same_neighbours(ik.knn(*on[:2], 5, backend=backend.name), expected, query, ref, acc_dtype_of(dtype))


def test_exact_indices_without_ties(backend):
    # Each query is a slightly moved copy of one ref row: its nearest neighbour is that row.
    generator = torch.Generator().manual_seed(2)
    ref = torch.randn(500, 64, generator=generator)
    pick = torch.randperm(500, generator=generator)[:120]
    query = ref[pick] + 1e-3 * torch.randn(120, 64, generator=generator)
    got = ik.knn(query.to(backend.device), ref.to(backend.device), 1, backend=backend.name)
    assert torch.equal(got[:, 0].cpu(), pick)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_large_segments(backend, dtype):
    device = on_cuda(backend)
    torch.manual_seed(3)
    cu_query, cu_ref = offsets([2600, 700, 1], device), offsets([1400, 380, 9], device)
    query = torch.randn(3301, 1280, device=device).to(dtype)
    ref = torch.randn(1789, 1280, device=device).to(dtype)
    got = ik.knn(query, ref, 10, cu_query, cu_ref, backend=backend.name)
    check_against_reference(got, query, ref, 10, cu_query, cu_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference_across_ref_tiles(backend, dtype):
    device = on_cuda(backend)
    generator = torch.Generator().manual_seed(6)
    query, ref = (torch.randn(n, 48, generator=generator).to(dtype) for n in (300, 5000))
    cu_query, cu_ref = offsets([150, 0, 150]), offsets([4500, 5, 495])
    for k in (1, 10, 40):  # 40: above the CUDA kernels' warp-held list (cpp: the ATen topk merge)
        got = ik.knn(query.to(device), ref.to(device), k, cu_query.to(device), cu_ref.to(device), backend=backend.name)
        expected = knn_reference(query, ref, k, cu_query, cu_ref)
        assert_same_neighbours(got, expected, query, ref, acc_dtype_of(dtype))
