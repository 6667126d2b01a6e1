"""``ngr_attention`` on every backend (``conftest.BACKENDS``): hand-computed cases, varlen segments
(empty, one-token, keyless, straddling tiles), head dims and scales, strided inputs, the optional
rotary and query gather (fused by backends that declare them, done with PyTorch before the others),
fallbacks (fp64, wide heads, fp32 on the fp16/bf16 libraries), and the fused options' checks.

Error bound: ``assert_close_to_reference`` with PyTorch's own same-dtype attention (``sdpa``) as
the yardstick, so fp16 results may be a few times less exact than PyTorch's, never more.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import offsets, on_cuda

import ipcv_kernels as ik
from ipcv_kernels.ops.attention_backends import ngr_attention_sdpa
from ipcv_kernels.reference import ngr_attention_reference
from ipcv_kernels.reference.rotary import apply_rotary_vision
from ipcv_kernels.testing import assert_close, assert_close_to_reference

OP = "ngr_attention"
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


def _attention_by_hand(q, k, v, scale):
    """Two-loop softmax attention for one query row and one head, in Python floats."""
    logits = [scale * sum(a * b for a, b in zip(q, key, strict=True)) for key in k]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [sum(w * val[d] for w, val in zip(weights, v, strict=True)) / total for d in range(len(v[0]))]


def test_hand_case_with_empty_and_keyless_segments(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, 1, 2).to(backend.device) for n in (3, 5, 5))
    # Segment 0: 2 queries over 3 keys; segment 1: no queries, 1 key; segment 2: 1 query, 1 key;
    # segment 3: 0 queries, 0 keys.
    cu_q, cu_k = offsets([2, 0, 1, 0], backend.device), offsets([3, 1, 1, 0], backend.device)
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name).cpu()
    scale = 2**-0.5
    rows = [(0, slice(0, 3)), (1, slice(0, 3)), (2, slice(4, 5))]
    for i, keys in rows:
        expected = _attention_by_hand(q[i, 0].tolist(), k[keys, 0].tolist(), v[keys, 0].tolist(), scale)
        assert_close(got[i, 0], torch.tensor(expected))


def test_query_without_keys_is_zero(backend):
    q, k = torch.randn(2, 2, 8, device=backend.device), torch.randn(3, 2, 8, device=backend.device)
    cu_q, cu_k = offsets([1, 1], backend.device), offsets([3, 0], backend.device)
    got = ik.ngr_attention(q, k, k, cu_q, cu_k, backend=backend.name)
    assert torch.all(got[1] == 0)


@pytest.mark.parametrize("head_dim", [80, 64])
def test_head_dim_and_scale(backend, head_dim):
    torch.manual_seed(1)
    q, k, v = (torch.randn(n, 3, head_dim, dtype=torch.float64) for n in (5, 11, 11))
    cu_q, cu_k = offsets([2, 3]), offsets([4, 7])
    on = [t.to(backend.device) for t in (q, k, v, cu_q, cu_k)]
    got = ik.ngr_attention(*on, softmax_scale=0.1, backend=backend.name).cpu()
    for (q0, q1), (k0, k1) in (((0, 2), (0, 4)), ((2, 5), (4, 11))):
        probs = torch.softmax(0.1 * torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1]), -1)
        assert_close(got[q0:q1], torch.einsum("hqk,khd->qhd", probs, v[k0:k1]))


def test_keeps_query_dtype(backend):
    q = torch.randn(4, 2, 16, dtype=torch.float16, device=backend.device)
    cu = offsets([4], backend.device)
    assert ik.ngr_attention(q, q, q, cu, cu, backend=backend.name).dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_varlen_segments(backend, dtype, head_dim):
    cu_q, cu_k = offsets(Q_LENGTHS, backend.device), offsets(K_LENGTHS, backend.device)
    q, k, v = random_qkv(sum(Q_LENGTHS), sum(K_LENGTHS), 2, head_dim, dtype, backend.device)
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name)
    check(got, q, k, v, cu_q, cu_k)
    # Queries of segment 3 have no keys: exactly zero.
    assert got[6:9].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_query_tiles_inside_one_segment(backend, dtype):
    # Query tiles wholly inside a long segment take the unmasked key loop up to the segment's last
    # whole key tile, then the masked tail; the last query tile straddles into a short segment.
    lengths_q, lengths_k = [300, 7], [203, 9]
    cu_q, cu_k = offsets(lengths_q, backend.device), offsets(lengths_k, backend.device)
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 2, 80, dtype, backend.device, seed=10)
    check(ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name), q, k, v, cu_q, cu_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segment_without_keys_sharing_a_start(backend, dtype):
    # Segment 1 has queries but no keys, so its key range [0, 0) starts where segment 2's [0, 150)
    # does: a query tile holding both must still mask every key for segment 1's rows (all zero),
    # not take the unmasked loop over segment 2's whole key tiles.
    lengths_q, lengths_k = [0, 3, 140], [0, 0, 150]
    cu_q, cu_k = offsets(lengths_q, backend.device), offsets(lengths_k, backend.device)
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 2, 80, dtype, backend.device, seed=11)
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name)
    check(got, q, k, v, cu_q, cu_k)
    assert got[:3].eq(0).all()


def test_odd_head_dim_and_scale(backend):
    cu_q, cu_k = offsets([3, 4], backend.device), offsets([5, 2], backend.device)
    q, k, v = random_qkv(7, 7, 3, 37, torch.float32, backend.device, seed=1)
    check(ik.ngr_attention(q, k, v, cu_q, cu_k, softmax_scale=0.3, backend=backend.name), q, k, v, cu_q, cu_k, 0.3)


def test_non_contiguous_inputs(backend):
    # k and v as views of a packed [n, 2, H, Dh] projection; q with heads and rows transposed.
    cu_q, cu_k = offsets([6, 11], backend.device), offsets([13, 20], backend.device)
    generator = torch.Generator().manual_seed(2)
    kv = torch.randn(33, 2, 3, 64, generator=generator).to(backend.device)
    k, v = kv.unbind(1)
    q = torch.randn(3, 17, 64, generator=generator).to(backend.device).transpose(0, 1)
    assert not (k.is_contiguous() or q.is_contiguous())
    check(ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name), q, k, v, cu_q, cu_k)


def test_tiny_head_dim(backend):
    # Dh = 8: one 16-wide chunk, half of it masked.
    cu_q, cu_k = offsets([3, 4], backend.device), offsets([5, 2], backend.device)
    q, k, v = random_qkv(7, 7, 2, 8, torch.float16, backend.device, seed=8)
    check(ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name), q, k, v, cu_q, cu_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["q_rows", "q_positions"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_fused_rotary_and_query_rows(backend, dtype, mode, head_dim):
    # Kept queries over full keys, as in an attention-stabilisation block. Dh = 80 rotates a 64-wide
    # and a 16-wide column chunk whose rotate_half partners lie in the other chunk.
    lengths = [12, 1, 0, 67]
    cu_k = offsets(lengths, backend.device)
    n = sum(lengths)
    q_full, k, v = random_qkv(n, n, 2, head_dim, dtype, backend.device, seed=3)
    generator = torch.Generator().manual_seed(4)
    cos, sin = (torch.randn(n, head_dim, generator=generator).to(backend.device) for _ in range(2))
    keep = torch.tensor([0, 4, 5, 11, 12, *range(14, 80, 3)], device=backend.device)
    cu_q = torch.searchsorted(keep, cu_k.long()).to(torch.int32)
    if mode == "q_rows":
        got = ik.ngr_attention(q_full, k, v, cu_q, cu_k, rotary=(cos, sin), q_rows=keep, backend=backend.name)
    else:
        got = ik.ngr_attention(
            q_full[keep], k, v, cu_q, cu_k, rotary=(cos, sin), q_positions=keep, backend=backend.name
        )
    q_rot = apply_rotary_vision(q_full[keep], cos[keep], sin[keep])
    k_rot = apply_rotary_vision(k, cos, sin)
    check(got, q_rot, k_rot, v, cu_q, cu_k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_gpu_long_segments(backend, dtype, head_dim):
    cuda_device = on_cuda(backend)
    lengths_q, lengths_k = [350, 0, 1400, 3], [1000, 17, 4000, 0]
    cu_q, cu_k = offsets(lengths_q, cuda_device), offsets(lengths_k, cuda_device)
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 4, head_dim, dtype, cuda_device, seed=5)
    check(ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name), q, k, v, cu_q, cu_k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_rotary_gather(backend, dtype):
    cuda_device = on_cuda(backend)
    n = 4096
    cu_k = offsets([n], cuda_device)
    q_full, k, v = random_qkv(n, n, 16, 80, dtype, cuda_device, seed=6)
    cos, sin = torch.randn(n, 80, device=cuda_device), torch.randn(n, 80, device=cuda_device)
    keep = torch.randperm(n, device=cuda_device)[: int(n * 0.35)].sort().values
    cu_q = offsets([keep.numel()], cuda_device)
    got = ik.ngr_attention(q_full, k, v, cu_q, cu_k, rotary=(cos, sin), q_rows=keep, backend=backend.name)
    check(got, apply_rotary_vision(q_full[keep], cos[keep], sin[keep]), apply_rotary_vision(k, cos, sin), v, cu_q, cu_k)


def test_fp64_and_wide_heads_fall_back_with_fused_options(backend):
    # No kernel for fp64 or Dh > 256: the reference runs, the fused options still apply.
    cu = offsets([5, 4], backend.device)
    for dtype, head_dim in ((torch.float64, 16), (torch.float32, 288)):
        q, k, v = random_qkv(9, 9, 1, head_dim, dtype, backend.device, seed=7)
        cos, sin = torch.randn(9, head_dim, device=backend.device), torch.randn(9, head_dim, device=backend.device)
        rows = torch.tensor([1, 2, 6], device=backend.device)
        cu_q = offsets([2, 1], backend.device)
        got = ik.ngr_attention(q, k, v, cu_q, cu, rotary=(cos, sin), q_rows=rows, backend=backend.name)
        q_rot = apply_rotary_vision(q[rows], cos[rows], sin[rows])
        torch.testing.assert_close(got, ngr_attention_reference(q_rot, apply_rotary_vision(k, cos, sin), v, cu_q, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_reference(backend, dtype):
    cuda_device = on_cuda(backend)
    lengths_q, lengths_k = [300, 1, 700, 5], [900, 5, 2100, 0]  # the last queries have no keys: rows of 0
    cu_q, cu_k = offsets(lengths_q, cuda_device), offsets(lengths_k, cuda_device)
    generator = torch.Generator(device=cuda_device).manual_seed(0)
    q = torch.randn(sum(lengths_q), 16, 80, device=cuda_device, generator=generator).to(dtype)
    k, v = (torch.randn(sum(lengths_k), 16, 80, device=cuda_device, generator=generator).to(dtype) for _ in range(2))
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend.name)
    expected = ngr_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k)
    assert_close_to_reference(got, expected, ik.ngr_attention(q, k, v, cu_q, cu_k, backend="sdpa"))


@pytest.mark.gpu
def test_gpu_fp32_matches_sdpa(backend):
    # The library kernels take fp16/bf16 only: fp32 runs per-segment sdpa, so auto never fails.
    cuda_device = on_cuda(backend)
    q = torch.randn(4, 2, 64, device=cuda_device)
    cu = offsets([4], cuda_device)
    got = ik.ngr_attention(q, q, q, cu, cu, backend=backend.name)
    torch.testing.assert_close(got, ik.ngr_attention(q, q, q, cu, cu, backend="sdpa"))


def fused_case(n=12, heads=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, head_dim, generator=generator) for _ in range(3))
    cos, sin = (torch.randn(n, head_dim, generator=generator) for _ in range(2))
    rows = torch.tensor([0, 3, 4, 9, 11])
    return q, k, v, (cos, sin), rows, offsets([3, 2]), offsets([7, 5])


def test_fused_options(backend):
    # Backends without fusion get the gathered, rotated tensors computed by PyTorch first; those
    # declaring the steps do them themselves.
    q, k, v, (cos, sin), rows, cu_q, cu_k = (
        t.to(backend.device) if isinstance(t, torch.Tensor) else tuple(x.to(backend.device) for x in t)
        for t in fused_case()
    )
    expected = ngr_attention_reference(
        apply_rotary_vision(q[rows], cos[rows], sin[rows]), apply_rotary_vision(k, cos, sin), v, cu_q, cu_k
    )
    by_rows = ik.ngr_attention(q, k, v, cu_q, cu_k, rotary=(cos, sin), q_rows=rows, backend=backend.name)
    by_positions = ik.ngr_attention(
        q[rows], k, v, cu_q, cu_k, rotary=(cos, sin), q_positions=rows, backend=backend.name
    )
    torch.testing.assert_close(by_rows, expected)
    torch.testing.assert_close(by_positions, expected)
    gathered = ik.ngr_attention(q, k, v, cu_q, cu_k, q_rows=rows, backend=backend.name)
    torch.testing.assert_close(gathered, ngr_attention_reference(q[rows], k, v, cu_q, cu_k))


def test_fused_options_are_validated():
    q, k, v, (cos, sin), rows, cu_q, cu_k = fused_case()

    def call(q=q, cu_q=cu_q, **options):
        return ik.ngr_attention(q, k, v, cu_q, cu_k, backend="torch", **options)

    with pytest.raises(ValueError, match="mutually exclusive"):
        call(rotary=(cos, sin), q_rows=rows, q_positions=rows)
    with pytest.raises(ValueError, match="q_positions needs rotary"):
        call(q=q[rows], q_positions=rows)
    with pytest.raises(TypeError, match="rotary must be a \\(cos, sin\\) tuple"):
        call(rotary=cos, q_rows=rows)
    with pytest.raises(ValueError, match="rotary cos must have shape"):
        call(rotary=(cos[:5], sin), q_rows=rows)
    with pytest.raises(ValueError, match="q_rows must hold row indices in \\[0, 12\\)"):
        call(q_rows=torch.tensor([0, 3, 4, 9, 12]))
    with pytest.raises(TypeError, match="q_rows must have dtype"):
        call(q_rows=rows.float())
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the number of rows \\(5\\)"):
        call(q_rows=rows, cu_q=offsets([3, 3]))
    with pytest.raises(ValueError, match="q_positions must have 12 entries"):
        call(rotary=(cos, sin), q_positions=rows, cu_q=offsets([6, 6]))
    with pytest.raises(ValueError, match="even head dim"):
        odd = torch.randn(12, 2, 7)
        ik.ngr_attention(odd, odd, odd, offsets([12]), offsets([12]), rotary=(cos[:, :7], sin[:, :7]))
