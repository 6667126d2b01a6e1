"""The Triton NGR kernel through the ``ngr_reconstruct`` op, against the fp64 reference (interpreter
on CPU, or CUDA). Its in-place full-buffer restore with fused LayerNorm (``ngr_restore``) is tested
with the other backends of that op in ``test_restore.py``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ipcv_kernels.reference import ngr_reconstruct_reference
from ipcv_kernels.testing import assert_close_to_reference
from ipcv_kernels.triton.ngr_reconstruct import ngr_reconstruct_triton


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_reconstruct_matches_reference(triton_device, dtype, index_dtype):
    # 300 features: two feature tiles of 256, the second partial; 13 rows: a partial row tile.
    base_drop, kept, base_kept, neighbors = random_case(13, 9, 300, 4, dtype, triton_device)
    got = ngr_reconstruct_triton(base_drop, kept, base_kept, neighbors.to(index_dtype))
    check(got, base_drop, kept, base_kept, neighbors)
    assert torch.equal(got[0], base_drop[0])


def test_reconstruct_empty_and_non_contiguous(triton_device):
    base_drop, kept, base_kept, neighbors = random_case(0, 5, 16, 3, torch.float32, triton_device)
    assert ngr_reconstruct_triton(base_drop, kept, base_kept, neighbors).shape == (0, 16)
    base_drop, kept, base_kept, neighbors = random_case(11, 7, 24, 3, torch.float32, triton_device, seed=1)
    wide = torch.randn(7, 50, device=triton_device)
    kept_view = wide[:, 3:27]  # row stride 50
    base_drop_t = base_drop.T.contiguous().T  # feature stride != 1
    got = ngr_reconstruct_triton(base_drop_t, kept_view, base_kept, neighbors)
    check(got, base_drop, kept_view, base_kept, neighbors)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_qwen2_vl_width(cuda_device, dtype):
    base_drop, kept, base_kept, neighbors = random_case(2662, 1434, 1280, 10, dtype, cuda_device)
    check(ngr_reconstruct_triton(base_drop, kept, base_kept, neighbors), base_drop, kept, base_kept, neighbors)
