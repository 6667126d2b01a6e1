"""Helpers of the Triton attention kernel that no op exposes: the head-dim column chunks and the
key rotation pass (interpreter on CPU, or CUDA). The kernel itself is tested through
``ngr_attention`` with every backend in ``test_ngr_attention.py``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ipcv_kernels.reference.rotary import apply_rotary_vision
from ipcv_kernels.testing import assert_close
from ipcv_kernels.triton.ngr_attention import head_dim_chunks, rotate_rows_triton


def test_head_dim_chunks():
    # Two power-of-two column chunks, at least 16 wide (tl.dot's smallest extent), padding little.
    assert head_dim_chunks(64) == (64, 0)
    assert head_dim_chunks(80) == (64, 16)
    assert head_dim_chunks(96) == (64, 32)
    assert head_dim_chunks(128) == (128, 0)
    assert head_dim_chunks(200) == (128, 128)
    assert head_dim_chunks(256) == (128, 128)
    assert head_dim_chunks(37) == (32, 16)
    assert head_dim_chunks(8) == (16, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96])
def test_rotate_rows_matches_reference(triton_device, dtype, head_dim):
    # Key rotation (the model's rotary rounded to the input dtype), from strided views of a packed kv.
    generator = torch.Generator().manual_seed(9)
    kv = torch.randn(37, 2, 3, head_dim, generator=generator).to(device=triton_device, dtype=dtype)
    k = kv[:, 0]
    cos, sin = (torch.randn(37, head_dim, generator=generator).to(triton_device) for _ in range(2))
    got = rotate_rows_triton(k, cos, sin)
    expected = apply_rotary_vision(k, cos, sin)
    assert got.is_contiguous() and got.dtype == dtype
    # One rounding to the dtype on both sides; fp32 FMA contraction may move it by an ulp.
    assert_close(got, expected)
