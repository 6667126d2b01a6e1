"""Non-causal varlen flash attention with separate query / key segments and an optional query-row
gather; and the rotary kernel that rotates (and gathers) query and key rows before it.

``out[i] = sum_j softmax_j(scale * q_i . k_j) v_j`` over the key rows ``j`` of query row ``i``'s
segment, computed with the online softmax (running max ``m``, running sum ``l``) over key tiles, so
no ``queries x keys`` matrix exists beyond one ``BLOCK_M x BLOCK_N`` tile in registers.

Head dim: Triton tiles are powers of two, so a head dim is split into two column chunks,
``A = [0, BLOCK_A)`` and the remainder ``B = [BLOCK_A, Dh)`` padded to a power of two (``HAS_B``).
``q . k = q_A . k_A + q_B . k_B`` and the output columns of the two chunks accumulate separately,
so Qwen2-VL's ``Dh = 80`` runs as ``64 + 16`` columns instead of 128: padding to 128 would cost
1.6x the tensor-core work in both products.

Rotary (``x * cos + rotate_half(x) * sin``; ``rotate_half(x)[c] = -x[c + Dh/2]`` for ``c < Dh/2``
and ``x[c - Dh/2]`` otherwise) runs in ``rotary_kernel``, one pass over the kept queries and one
over the keys, before attention. Inside the key loop it would redo the fp32 rotation and reload
fp32 ``cos`` / ``sin`` tiles for every query tile (about as much work per key as the ``q . k``
product), and rotating queries in the attention kernel holds them in registers, which forces
smaller tiles (sm_90 compiles in ``tests/ops/test_triton_compile.py``).

``ngr_attention_triton`` launches both and is the ``"triton"`` backend of ``ngr_attention``,
declaring ``fuses={"rotary", "q_gather"}``.
"""

import math

import torch
import triton
import triton.language as tl

from ..ops.ngr_attention import MAX_HEAD_DIM, Q_GATHER, ROTARY
from ..ops.vectorized_backend import segment_of_rows
from ..reference import ngr_attention_reference, unfused_attention_inputs
from ._backend import dot_precision, kernel_dtype, register_triton, row_major

MAX_CHUNK = 128  # see head_dim_chunks


@triton.jit
def rotary_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    index_ptr,
    num_rows,
    head_dim,
    half,
    stride_xn,
    stride_xh,
    stride_xd,
    stride_on,
    stride_oh,
    stride_cos,
    stride_sin,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    GATHER: tl.constexpr,
):
    # out[i, h] = x[src_i, h] * cos[pos_i] + rotate_half(x[src_i, h]) * sin[pos_i], in fp32, rounded
    # to x's dtype as the models' own rotary is before attention. pos_i = index[i] (or i); src_i =
    # pos_i when gathering, else i. One program: BLOCK_R rows of one head.
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    position = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64) if HAS_INDEX else rows.to(tl.int64)
    source = position if GATHER else rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    partner = tl.where(cols < half, cols + half, cols - half)
    sign = tl.where(cols < half, -1.0, 1.0)
    mask = row_ok[:, None] & (cols < head_dim)[None, :]
    base = x_ptr + source[:, None] * stride_xn + head * stride_xh
    x = tl.load(base + cols[None, :] * stride_xd, mask=mask, other=0.0)
    x_partner = tl.load(base + partner[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + position[:, None] * stride_cos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position[:, None] * stride_sin + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rotated = x.to(tl.float32) * cos + sign[None, :] * x_partner * sin
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_on + head * stride_oh + cols[None, :]
    tl.store(out_ptrs, rotated.to(x.dtype), mask=mask)


@triton.jit
def _attend_key_tile(
    acc_a, acc_b, m_i, l_i, q_a, q_b, k_ptr, v_ptr, head, stride_kn, stride_kh, stride_kd, stride_vn,
    stride_vh, stride_vd, cols_a, a_ok, cols_b, b_ok, k_start, k_end, n0, stop, scale_log2,
    BLOCK_N: tl.constexpr, HAS_B: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # One step of the online softmax, over the keys [n0, n0 + BLOCK_N). MASKED: the tile may hold
    # keys past `stop` or outside a row's own segment [k_start, k_end). Unmasked tiles are whole
    # and inside every row's segment: they skip the per-score compares and selects, since the
    # score tile's elementwise work, not the MMAs, bounds attention at head dims like 64 and 80.
    cols = n0 + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)[:, None]
    k_base = k_ptr + cols64 * stride_kn + head * stride_kh
    v_base = v_ptr + cols64 * stride_vn + head * stride_vh
    if MASKED:
        col_ok = cols < stop
        mask_a = col_ok[:, None] & a_ok[None, :]
        mask_b = col_ok[:, None] & b_ok[None, :]
    else:
        mask_a = a_ok[None, :]
        mask_b = b_ok[None, :]
    k_a = tl.load(k_base + cols_a[None, :] * stride_kd, mask=mask_a, other=0.0)
    scores = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
    if HAS_B:
        k_b = tl.load(k_base + cols_b[None, :] * stride_kd, mask=mask_b, other=0.0)
        scores = tl.dot(q_b, tl.trans(k_b), scores, input_precision=DOT_PRECISION)
    # Softmax in base 2: exp(s * scale) = exp2(s * scale * log2(e)), with scale_log2 folded in.
    scores = scores * scale_log2
    if MASKED:
        valid = (cols[None, :] >= k_start[:, None]) & (cols[None, :] < k_end[:, None])
        scores = tl.where(valid, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_a = tl.load(v_base + cols_a[None, :] * stride_vd, mask=mask_a, other=0.0)
    p = p.to(v_a.dtype)
    acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
    if HAS_B:
        v_b = tl.load(v_base + cols_b[None, :] * stride_vd, mask=mask_b, other=0.0)
        acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def varlen_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    q_segment_ptr,
    cu_k_ptr,
    q_rows_ptr,
    num_q,
    head_dim,
    scale_log2,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_on,
    stride_oh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    HAS_B: tl.constexpr,
    GATHER_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UNMASKED_INTERIOR: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_q
    segment = tl.load(q_segment_ptr + rows, mask=row_ok, other=0)
    k_start = tl.load(cu_k_ptr + segment, mask=row_ok, other=0)
    k_end = tl.load(cu_k_ptr + segment + 1, mask=row_ok, other=0)
    # A query tile may straddle segments: walk the union [lo, hi) of their key ranges, masked per
    # row. When every row shares one segment (lo is also the largest start), the whole key tiles
    # from lo up to the smallest end need no mask: only the tail tile is masked.
    lo = tl.min(tl.where(row_ok, k_start, 2147483647), axis=0)
    hi = tl.max(k_end, axis=0)

    # Query i is row q_rows[i] of a full-length q when gathering, else row i.
    source = tl.load(q_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64) if GATHER_Q else rows.to(tl.int64)
    q_base = q_ptr + source[:, None] * stride_qn + head * stride_qh
    cols_a = tl.arange(0, BLOCK_A)
    a_ok = cols_a < head_dim
    q_a = tl.load(q_base + cols_a[None, :] * stride_qd, mask=row_ok[:, None] & a_ok[None, :], other=0.0)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    b_ok = cols_b < head_dim
    if HAS_B:
        q_b = tl.load(q_base + cols_b[None, :] * stride_qd, mask=row_ok[:, None] & b_ok[None, :], other=0.0)
    else:
        q_b = tl.zeros([BLOCK_M, BLOCK_B], q_a.dtype)  # never read
    acc_a = tl.zeros([BLOCK_M, BLOCK_A], tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_B], tl.float32)  # stays 0 without a second chunk
    # Finite start for the running max: a tile whose keys are all masked (-inf) then gives
    # p = exp2(-inf) = 0 and alpha = 1 instead of NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)

    unmasked_stop = lo
    if UNMASKED_INTERIOR:
        shared_start = tl.max(k_start, axis=0) == lo
        common_end = tl.min(tl.where(row_ok, k_end, 2147483647), axis=0)
        unmasked_stop = tl.where(shared_start, lo + (common_end - lo) // BLOCK_N * BLOCK_N, lo)
        for n0 in range(lo, unmasked_stop, BLOCK_N):
            acc_a, acc_b, m_i, l_i = _attend_key_tile(
                acc_a, acc_b, m_i, l_i, q_a, q_b, k_ptr, v_ptr, head, stride_kn, stride_kh, stride_kd,
                stride_vn, stride_vh, stride_vd, cols_a, a_ok, cols_b, b_ok, k_start, k_end, n0, hi,
                scale_log2, BLOCK_N, HAS_B, False, DOT_PRECISION,
            )  # fmt: skip
    # The tail, or every tile of a query tile that straddles segments (every tile without
    # UNMASKED_INTERIOR: wide heads, whose two loops would spill registers); not software-pipelined
    # after the interior loop, so that its buffers do not add to that loop's registers.
    for n0 in tl.range(unmasked_stop, hi, BLOCK_N, num_stages=1 if UNMASKED_INTERIOR else None):
        acc_a, acc_b, m_i, l_i = _attend_key_tile(
            acc_a, acc_b, m_i, l_i, q_a, q_b, k_ptr, v_ptr, head, stride_kn, stride_kh, stride_kd,
            stride_vn, stride_vh, stride_vd, cols_a, a_ok, cols_b, b_ok, k_start, k_end, n0, hi,
            scale_log2, BLOCK_N, HAS_B, True, DOT_PRECISION,
        )  # fmt: skip

    # Rows whose segment has no keys have l = 0 and acc = 0: they come out as 0.
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    out_base = out_ptr + rows.to(tl.int64)[:, None] * stride_on + head * stride_oh
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_base + cols_a[None, :], (acc_a * inv_l[:, None]).to(out_ty), mask=row_ok[:, None] & a_ok[None, :])
    if HAS_B:
        tl.store(out_base + cols_b[None, :], (acc_b * inv_l[:, None]).to(out_ty), mask=row_ok[:, None] & b_ok[None, :])


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_A, BLOCK_B)``: the power-of-two column chunks of a head dim (``BLOCK_B = 0``: one chunk).

    ``BLOCK_A`` is the largest power of two ``<= Dh``, at most 128, and ``BLOCK_B`` the remainder
    rounded up to one (both at least 16, ``tl.dot``'s smallest extent): 80 -> (64, 16),
    96 -> (64, 32), 128 -> (128, 0), 256 -> (128, 128). Chunks wider than 128 columns spill
    registers at any tile size that fits.
    """
    block_a = min(MAX_CHUNK, max(16, 1 << (max(head_dim, 1).bit_length() - 1)))
    rest = head_dim - block_a
    return block_a, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def attention_launch_config(head_dim: int, dtype: torch.dtype) -> dict[str, int | bool]:
    """Column chunks, tiles, warps, pipeline depth and loop split of ``varlen_attention_kernel``.

    Chosen from compiling for sm_90 without a GPU (``tests/ops/test_triton_compile.py`` keeps them
    there, under both CI's Triton and the GPU image's): the largest tiles with no register spills
    and at most ~110 KiB of shared memory, so two programs share an SM. 16-bit inputs take
    128 x 64 tiles with 8 warps up to 96 columns (Triton's Hopper attention tutorial shape; Qwen2-VL's
    80), narrower key tiles as the head widens. fp32 operands (full-precision FMA products, no
    tensor cores) need small tiles; fp32 attention is a correctness path, not a fast one.
    """
    block_a, block_b = head_dim_chunks(head_dim)
    width = block_a + block_b
    if dtype == torch.float32:  # a second column chunk needs narrower key tiles
        tiles = {"BLOCK_M": 32, "BLOCK_N": 16 if block_b else 32, "num_warps": 8, "num_stages": 2}
    elif width <= 96:
        tiles = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    elif width <= 128:
        tiles = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    elif width <= 160:
        tiles = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    else:
        tiles = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    # A second key loop for the unmasked interior tiles would spill registers with fp32 operands
    # and wide heads (which spend relatively less on the score tile's masking anyway).
    chunks = {"BLOCK_A": block_a, "BLOCK_B": max(block_b, 16), "HAS_B": block_b > 0}
    return {**chunks, **tiles, "UNMASKED_INTERIOR": dtype != torch.float32 and width <= 160}


def rotate_rows_triton(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotary rows: ``out[i] = x[s_i] * cos[p_i] + rotate_half(x[s_i]) * sin[p_i]`` per head.

    ``p_i = s_i = rows[i]`` with ``rows`` (a gather), ``p_i = positions[i]``, ``s_i = i`` with
    ``positions``, else ``p_i = s_i = i``. Computed in fp32, rounded to ``x``'s dtype (as the models'
    own rotary), written to a new contiguous ``[M, H, Dh]`` tensor.

    Args:
        x: ``[Nx, H, Dh]`` fp16/bf16/fp32, any strides, ``Dh`` even (queries or keys).
        cos, sin: ``[P, Dh]`` any float dtype, unit stride on the last dim.
        rows, positions: optional int ``[M]`` (mutually exclusive).
    """
    index = rows if rows is not None else positions
    num_rows = index.shape[0] if index is not None else x.shape[0]
    num_heads, head_dim = x.shape[1], x.shape[2]
    out = torch.empty((num_rows, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_r = max(1, 2048 // block_d)
    rotary_kernel[(triton.cdiv(num_rows, block_r), num_heads)](
        x,
        out,
        cos,
        sin,
        index if index is not None else cos,
        num_rows,
        head_dim,
        head_dim // 2,
        *x.stride(),
        out.stride(0),
        out.stride(1),
        cos.stride(0),
        sin.stride(0),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        HAS_INDEX=index is not None,
        GATHER=rows is not None,
        num_warps=4,
    )
    return out


def ngr_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    q_rows: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen flash attention (the ``ngr_attention`` contract) with optional rotary / q gather.

    Args:
        q: ``[Nq, H, Dh]``, or with ``q_rows`` a full-length ``[n, H, Dh]`` to gather from; any strides.
        k, v: ``[Nkv, H, Dh]`` same dtype (fp16/bf16/fp32), any strides; ``Dh <= 256``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` (``cu_seqlens_q`` counts the attending queries).
        softmax_scale: defaults to ``Dh ** -0.5``.
        rotary: ``(cos, sin)``, each ``[Nkv, Dh]``: row ``j`` rotates key row ``j``; queries use the
            rows ``q_rows`` / ``q_positions`` (or row ``i`` when neither is given). ``Dh`` even.
            ``rotate_rows_triton`` writes the rotated queries (kept rows only) and keys first.
        q_rows: int64 ``[Nq]``: the queries are ``q[q_rows]``; gathered inside the kernel (or by the
            rotary pass), so no copy of the full-length q is made.
        q_positions: int64 ``[Nq]``: rotary rows of a compact ``q`` (mutually exclusive with q_rows).

    Returns:
        ``[Nq, H, Dh]`` contiguous, in ``q``'s dtype; rows of a segment with no keys are 0.
    """
    if q_rows is not None and q_positions is not None:
        raise ValueError("q_rows and q_positions are mutually exclusive")
    head_dim = q.shape[-1]
    if not kernel_dtype(q.dtype) or head_dim > MAX_HEAD_DIM:
        q, k = unfused_attention_inputs(q, k, rotary, q_rows, q_positions)
        return ngr_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
    num_q = q_rows.shape[0] if q_rows is not None else q.shape[0]
    num_heads = q.shape[1]
    out = torch.empty((num_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_q == 0 or num_heads == 0:
        return out
    if rotary is not None:
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got {head_dim}")
        cos, sin = (row_major(t) for t in rotary)
        q = rotate_rows_triton(q, cos, sin, rows=q_rows, positions=q_positions)
        k = rotate_rows_triton(k, cos, sin)
        q_rows = None
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    config = attention_launch_config(head_dim, q.dtype)
    grid = (triton.cdiv(num_q, config["BLOCK_M"]), num_heads)
    varlen_attention_kernel[grid](
        q,
        k,
        v,
        out,
        segment_of_rows(cu_seqlens_q, num_q),
        cu_seqlens_k,
        q_rows if q_rows is not None else cu_seqlens_q,
        num_q,
        head_dim,
        scale * math.log2(math.e),
        *q.stride(),
        *k.stride(),
        *v.stride(),
        out.stride(0),
        out.stride(1),
        GATHER_Q=q_rows is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        **config,
    )
    return out


register_triton("ngr_attention", ngr_attention_triton, fuses=frozenset({ROTARY, Q_GATHER}))
