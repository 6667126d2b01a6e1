"""``ngr_reconstruct`` on every backend (``conftest.BACKENDS``): a hand case, rows without valid
neighbours, feature and row tiles, index dtypes, strided and empty inputs, against the fp64
reference. (Its in-place restore with a fused LayerNorm, ``ngr_restore``, has its own module.)"""

from __future__ import annotations

import pytest
import torch
from conftest import on_cuda, skip_unsupported

import ipcv_kernels as ik
from ipcv_kernels.reference import ngr_reconstruct_reference
from ipcv_kernels.testing import assert_close, assert_close_to_reference

OP = "ngr_reconstruct"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_case(num_drop, num_kept, dim, k, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    neighbors = torch.randint(-1, max(num_kept, 1), (num_drop, k), generator=generator).to(device)
    if num_drop:
        neighbors[0] = -1  # one row without any valid neighbour: must come out as its base
    return make(num_drop, dim), make(num_kept, dim), make(num_kept, dim), neighbors


def check(got, base_drop, kept, base_kept, neighbors):
    expected = ngr_reconstruct_reference(base_drop.double(), kept.double(), base_kept.double(), neighbors)
    same_dtype = ngr_reconstruct_reference(base_drop, kept, base_kept, neighbors)
    assert got.shape == base_drop.shape and got.dtype == base_drop.dtype
    assert_close_to_reference(got, expected, same_dtype)


def test_hand_case(backend):
    device = backend.device
    base_drop = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], device=device)
    base_kept = torch.tensor([[0.0, 0.0], [10.0, 10.0]], device=device)
    kept = torch.tensor([[1.0, 2.0], [13.0, 10.0]], device=device)  # deltas (1, 2) and (3, 0)
    neighbors = torch.tensor([[0, 1], [1, -1], [-1, -1]], device=device)
    got = ik.ngr_reconstruct(base_drop, kept, base_kept, neighbors, backend=backend.name)
    expected = torch.tensor([[1.0 + 2.0, 1.0 + 1.0], [2.0 + 3.0, 2.0], [3.0, 3.0]], device=device)
    assert_close(got, expected)


def test_no_dropped_rows(backend):
    device = backend.device
    got = ik.ngr_reconstruct(
        torch.empty(0, 4, device=device),
        torch.randn(3, 4, device=device),
        torch.randn(3, 4, device=device),
        torch.empty(0, 2, dtype=torch.long, device=device),
        backend=backend.name,
    )
    assert got.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_feature_and_row_tiles(backend, dtype, index_dtype):
    # 300 features: two Triton feature tiles of 256, the second partial; 13 rows: a partial row tile.
    base_drop, kept, base_kept, neighbors = random_case(13, 9, 300, 4, dtype, backend.device)
    got = ik.ngr_reconstruct(base_drop, kept, base_kept, neighbors.to(index_dtype), backend=backend.name)
    check(got, base_drop, kept, base_kept, neighbors)
    assert torch.equal(got[0], base_drop[0])


def test_empty_and_non_contiguous(backend):
    device = backend.device
    base_drop, kept, base_kept, neighbors = random_case(0, 5, 16, 3, torch.float32, device)
    assert ik.ngr_reconstruct(base_drop, kept, base_kept, neighbors, backend=backend.name).shape == (0, 16)
    base_drop, kept, base_kept, neighbors = random_case(11, 7, 24, 3, torch.float32, device, seed=1)
    wide = torch.randn(7, 50, device=device)
    kept_view = wide[:, 3:27]  # row stride 50
    base_drop_t = base_drop.T.contiguous().T  # feature stride != 1
    got = ik.ngr_reconstruct(base_drop_t, kept_view, base_kept, neighbors, backend=backend.name)
    check(got, base_drop, kept_view, base_kept, neighbors)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_across_dtypes(backend, dtype, index_dtype):
    skip_unsupported(backend, dtype)
    generator = torch.Generator().manual_seed(4)
    base_drop, kept, base_kept = (torch.randn(n, 72, generator=generator, dtype=torch.float64) for n in (30, 12, 12))
    neighbors = torch.randint(-1, 12, (30, 5), generator=generator)
    neighbors[3] = -1  # a row with no valid neighbour keeps base_drop
    neighbors = neighbors.to(index_dtype)
    inputs = [t.to(dtype) for t in (base_drop, kept, base_kept)]
    on = [t.to(backend.device) for t in (*inputs, neighbors)]
    got = ik.ngr_reconstruct(*on, backend=backend.name).cpu()
    assert got.dtype == dtype and got.shape == base_drop.shape
    expected64 = ngr_reconstruct_reference(*(t.double() for t in inputs), neighbors)
    assert_close_to_reference(got, expected64, ngr_reconstruct_reference(*inputs, neighbors))
    assert torch.equal(got[3], inputs[0][3])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_qwen2_vl_width(backend, dtype):
    base_drop, kept, base_kept, neighbors = random_case(2662, 1434, 1280, 10, dtype, on_cuda(backend))
    got = ik.ngr_reconstruct(base_drop, kept, base_kept, neighbors, backend=backend.name)
    check(got, base_drop, kept, base_kept, neighbors)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(backend, dtype):
    device = on_cuda(backend)
    generator = torch.Generator().manual_seed(6)
    base_drop, kept, base_kept = (torch.randn(n, 72, generator=generator).to(dtype) for n in (30, 12, 12))
    neighbors = torch.randint(-1, 12, (30, 5), generator=generator)
    on = [t.to(device) for t in (base_drop, kept, base_kept, neighbors)]
    got = ik.ngr_reconstruct(*on, backend=backend.name)
    expected64 = ngr_reconstruct_reference(base_drop.double(), kept.double(), base_kept.double(), neighbors)
    assert_close_to_reference(got.cpu(), expected64, ngr_reconstruct_reference(base_drop, kept, base_kept, neighbors))
