"""The Triton varlen attention kernel against the fp64 reference (interpreter on CPU, or CUDA).

Error bound: ``assert_close_to_reference`` with PyTorch's own same-dtype attention (``sdpa``) as
the yardstick, so fp16 results may be a few times less exact than PyTorch's, never more.
"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

pytest.importorskip("triton")

from ipcv_kernels.ops.attention_backends import ngr_attention_sdpa
from ipcv_kernels.reference import ngr_attention_reference
from ipcv_kernels.reference.rotary import apply_rotary_vision
from ipcv_kernels.testing import assert_close, assert_close_to_reference
from ipcv_kernels.triton.ngr_attention import head_dim_chunks, ngr_attention_triton, rotate_rows_triton

# Segments: odd sizes, an empty one, a one-token one, queries whose segment has no keys, keys
# without queries, and one segment longer than a 128-row tile so tiles straddle segments.
Q_LENGTHS = [5, 0, 1, 3, 150, 2]
K_LENGTHS = [9, 4, 1, 0, 131, 7]


def random_qkv(num_q, num_k, heads, head_dim, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(n):
        return torch.randn(n, heads, head_dim, generator=generator).to(device=device, dtype=dtype)

    return make(num_q), make(num_k), make(num_k)


def check(got, q, k, v, cu_q, cu_k, scale=None):
    expected = ngr_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k, scale)
    same_dtype = ngr_attention_sdpa(q, k, v, cu_q, cu_k, scale)
    assert got.shape == expected.shape and got.dtype == q.dtype
    assert_close_to_reference(got, expected, same_dtype)


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
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_varlen_segments(triton_device, dtype, head_dim):
    cu_q, cu_k = offsets(Q_LENGTHS, triton_device), offsets(K_LENGTHS, triton_device)
    q, k, v = random_qkv(sum(Q_LENGTHS), sum(K_LENGTHS), 2, head_dim, dtype, triton_device)
    got = ngr_attention_triton(q, k, v, cu_q, cu_k)
    check(got, q, k, v, cu_q, cu_k)
    # Queries of segment 3 have no keys: exactly zero.
    assert got[6:9].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_query_tiles_inside_one_segment(triton_device, dtype):
    # Query tiles wholly inside a long segment take the unmasked key loop up to the segment's last
    # whole key tile, then the masked tail; the last query tile straddles into a short segment.
    lengths_q, lengths_k = [300, 7], [203, 9]
    cu_q, cu_k = offsets(lengths_q, triton_device), offsets(lengths_k, triton_device)
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 2, 80, dtype, triton_device, seed=10)
    check(ngr_attention_triton(q, k, v, cu_q, cu_k), q, k, v, cu_q, cu_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segment_without_keys_sharing_a_start(triton_device, dtype):
    # Segment 1 has queries but no keys, so its key range [0, 0) starts where segment 2's [0, 150)
    # does: a query tile holding both must still mask every key for segment 1's rows (all zero),
    # not take the unmasked loop over segment 2's whole key tiles.
    lengths_q, lengths_k = [0, 3, 140], [0, 0, 150]
    cu_q, cu_k = offsets(lengths_q, triton_device), offsets(lengths_k, triton_device)
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 2, 80, dtype, triton_device, seed=11)
    got = ngr_attention_triton(q, k, v, cu_q, cu_k)
    check(got, q, k, v, cu_q, cu_k)
    assert got[:3].eq(0).all()


def test_odd_head_dim_and_scale(triton_device):
    cu_q, cu_k = offsets([3, 4], triton_device), offsets([5, 2], triton_device)
    q, k, v = random_qkv(7, 7, 3, 37, torch.float32, triton_device, seed=1)
    check(ngr_attention_triton(q, k, v, cu_q, cu_k, 0.3), q, k, v, cu_q, cu_k, 0.3)


def test_non_contiguous_inputs(triton_device):
    # k and v as views of a packed [n, 2, H, Dh] projection; q with heads and rows transposed.
    cu_q, cu_k = offsets([6, 11], triton_device), offsets([13, 20], triton_device)
    generator = torch.Generator().manual_seed(2)
    kv = torch.randn(33, 2, 3, 64, generator=generator).to(triton_device)
    k, v = kv.unbind(1)
    q = torch.randn(3, 17, 64, generator=generator).to(triton_device).transpose(0, 1)
    assert not (k.is_contiguous() or q.is_contiguous())
    check(ngr_attention_triton(q, k, v, cu_q, cu_k), q, k, v, cu_q, cu_k)


def test_tiny_head_dim(triton_device):
    # Dh = 8: one 16-wide chunk, half of it masked.
    cu_q, cu_k = offsets([3, 4], triton_device), offsets([5, 2], triton_device)
    q, k, v = random_qkv(7, 7, 2, 8, torch.float16, triton_device, seed=8)
    check(ngr_attention_triton(q, k, v, cu_q, cu_k), q, k, v, cu_q, cu_k)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["q_rows", "q_positions"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_fused_rotary_and_query_rows(triton_device, dtype, mode, head_dim):
    # Kept queries over full keys, as in an attention-stabilisation block. Dh = 80 rotates a 64-wide
    # and a 16-wide column chunk whose rotate_half partners lie in the other chunk.
    lengths = [12, 1, 0, 67]
    cu_k = offsets(lengths, triton_device)
    n = sum(lengths)
    q_full, k, v = random_qkv(n, n, 2, head_dim, dtype, triton_device, seed=3)
    generator = torch.Generator().manual_seed(4)
    cos, sin = (torch.randn(n, head_dim, generator=generator).to(triton_device) for _ in range(2))
    keep = torch.tensor([0, 4, 5, 11, 12, *range(14, 80, 3)], device=triton_device)
    cu_q = torch.searchsorted(keep, cu_k.long()).to(torch.int32)
    if mode == "q_rows":
        got = ngr_attention_triton(q_full, k, v, cu_q, cu_k, rotary=(cos, sin), q_rows=keep)
    else:
        got = ngr_attention_triton(q_full[keep], k, v, cu_q, cu_k, rotary=(cos, sin), q_positions=keep)
    q_rot = apply_rotary_vision(q_full[keep], cos[keep], sin[keep])
    k_rot = apply_rotary_vision(k, cos, sin)
    check(got, q_rot, k_rot, v, cu_q, cu_k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_gpu_long_segments(cuda_device, dtype, head_dim):
    lengths_q, lengths_k = [350, 0, 1400, 3], [1000, 17, 4000, 0]
    cu_q, cu_k = offsets(lengths_q, cuda_device), offsets(lengths_k, cuda_device)
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 4, head_dim, dtype, cuda_device, seed=5)
    check(ngr_attention_triton(q, k, v, cu_q, cu_k), q, k, v, cu_q, cu_k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_rotary_gather(cuda_device, dtype):
    n = 4096
    cu_k = offsets([n], cuda_device)
    q_full, k, v = random_qkv(n, n, 16, 80, dtype, cuda_device, seed=6)
    cos, sin = torch.randn(n, 80, device=cuda_device), torch.randn(n, 80, device=cuda_device)
    keep = torch.randperm(n, device=cuda_device)[: int(n * 0.35)].sort().values
    cu_q = offsets([keep.numel()], cuda_device)
    got = ngr_attention_triton(q_full, k, v, cu_q, cu_k, rotary=(cos, sin), q_rows=keep)
    check(got, apply_rotary_vision(q_full[keep], cos[keep], sin[keep]), apply_rotary_vision(k, cos, sin), v, cu_q, cu_k)


def test_fp64_and_wide_heads_fall_back_with_fused_options(triton_device):
    # No kernel for fp64 or Dh > 256: the reference runs, the fused options still apply.
    cu = offsets([5, 4], triton_device)
    for dtype, head_dim in ((torch.float64, 16), (torch.float32, 288)):
        q, k, v = random_qkv(9, 9, 1, head_dim, dtype, triton_device, seed=7)
        cos, sin = torch.randn(9, head_dim, device=triton_device), torch.randn(9, head_dim, device=triton_device)
        rows = torch.tensor([1, 2, 6], device=triton_device)
        cu_q = offsets([2, 1], triton_device)
        got = ngr_attention_triton(q, k, v, cu_q, cu, rotary=(cos, sin), q_rows=rows)
        q_rot = apply_rotary_vision(q[rows], cos[rows], sin[rows])
        torch.testing.assert_close(got, ngr_attention_reference(q_rot, apply_rotary_vision(k, cos, sin), v, cu_q, cu))
