"""Non-causal varlen flash attention with separate query / key segments, optional fused rotary
embedding and query-row gather.

``out[i] = sum_j softmax_j(scale * q_i . k_j) v_j`` over the key rows ``j`` of query row ``i``'s
segment, computed with the online softmax (running max ``m``, running sum ``l``) over key tiles, so
no ``queries x keys`` matrix exists beyond one ``BLOCK_M x BLOCK_N`` tile in registers.

The head dim is handled as two halves ``[0, half)`` and ``[half, Dh)``: that is exactly the
layout rotary needs (``rotate_half(x) = [-x_hi, x_lo]``), and ``q . k = q_lo . k_lo + q_hi . k_hi``
keeps the score exact for any head dim (80 is padded to two 64-wide halves rather than one 128).
"""

import triton
import triton.language as tl


@triton.jit
def _rotate(x_lo, x_hi, cos_ptr, sin_ptr, pos, stride_cos, stride_sin, d_lo, half, mask_lo, mask_hi):
    # Vision rotary: x * cos + rotate_half(x) * sin, in fp32, with cos/sin rows taken at ``pos``.
    pos64 = pos.to(tl.int64)[:, None]
    cos_lo = tl.load(cos_ptr + pos64 * stride_cos + d_lo[None, :], mask=mask_lo, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + pos64 * stride_cos + half + d_lo[None, :], mask=mask_hi, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + pos64 * stride_sin + d_lo[None, :], mask=mask_lo, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + pos64 * stride_sin + half + d_lo[None, :], mask=mask_hi, other=0.0).to(tl.float32)
    lo = x_lo.to(tl.float32)
    hi = x_hi.to(tl.float32)
    return lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi


@triton.jit
def varlen_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    q_segment_ptr,
    cu_k_ptr,
    q_index_ptr,
    cos_ptr,
    sin_ptr,
    num_q,
    head_dim,
    half,
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
    stride_cos,
    stride_sin,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_Q_INDEX: tl.constexpr,
    GATHER_Q: tl.constexpr,
    ROTARY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_q
    segment = tl.load(q_segment_ptr + rows, mask=row_ok, other=0)
    k_start = tl.load(cu_k_ptr + segment, mask=row_ok, other=0)
    k_end = tl.load(cu_k_ptr + segment + 1, mask=row_ok, other=0)
    # A query tile may straddle segments: walk the union of their key ranges, masked per row.
    lo = tl.min(tl.where(row_ok, k_start, 2147483647), axis=0)
    hi = tl.max(k_end, axis=0)

    # ``position``: the row of the full-length sequence of each query (its rotary row);
    # ``source``: where its q vector is read (the full-length q when gathering, else row i).
    position = tl.load(q_index_ptr + rows, mask=row_ok, other=0) if HAS_Q_INDEX else rows
    source = position.to(tl.int64) if GATHER_Q else rows.to(tl.int64)

    d_lo = tl.arange(0, BLOCK_HALF)
    lo_ok = d_lo < half
    hi_ok = d_lo + half < head_dim
    q_mask_lo = row_ok[:, None] & lo_ok[None, :]
    q_mask_hi = row_ok[:, None] & hi_ok[None, :]
    q_base = q_ptr + source[:, None] * stride_qn + head * stride_qh
    q_lo = tl.load(q_base + d_lo[None, :] * stride_qd, mask=q_mask_lo, other=0.0)
    q_hi = tl.load(q_base + (half + d_lo[None, :]) * stride_qd, mask=q_mask_hi, other=0.0)
    if ROTARY:
        # Rounded back to the input dtype, as the model's own rotary does before attention.
        q_rot_lo, q_rot_hi = _rotate(
            q_lo, q_hi, cos_ptr, sin_ptr, position, stride_cos, stride_sin, d_lo, half, q_mask_lo, q_mask_hi
        )
        q_lo = q_rot_lo.to(q_lo.dtype)
        q_hi = q_rot_hi.to(q_hi.dtype)

    d_v = tl.arange(0, BLOCK_DV)
    v_ok = d_v < head_dim
    # Finite start for the running max: a tile whose keys are all masked (-inf) then gives
    # p = exp2(-inf) = 0 and alpha = 1 instead of NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    tile_cols = tl.arange(0, BLOCK_N)

    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tile_cols
        col_ok = cols < hi
        cols64 = cols.to(tl.int64)
        k_mask_lo = col_ok[:, None] & lo_ok[None, :]
        k_mask_hi = col_ok[:, None] & hi_ok[None, :]
        k_base = k_ptr + cols64[:, None] * stride_kn + head * stride_kh
        k_lo = tl.load(k_base + d_lo[None, :] * stride_kd, mask=k_mask_lo, other=0.0)
        k_hi = tl.load(k_base + (half + d_lo[None, :]) * stride_kd, mask=k_mask_hi, other=0.0)
        if ROTARY:
            k_rot_lo, k_rot_hi = _rotate(
                k_lo, k_hi, cos_ptr, sin_ptr, cols, stride_cos, stride_sin, d_lo, half, k_mask_lo, k_mask_hi
            )
            k_lo = k_rot_lo.to(k_lo.dtype)
            k_hi = k_rot_hi.to(k_hi.dtype)
        scores = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PRECISION)
        scores = tl.dot(q_hi, tl.trans(k_hi), scores, input_precision=DOT_PRECISION)
        # Softmax in base 2: exp(s * scale) = exp2(s * scale * log2(e)), with scale_log2 folded in.
        scores = scores * scale_log2
        valid = (cols[None, :] >= k_start[:, None]) & (cols[None, :] < k_end[:, None])
        scores = tl.where(valid, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + cols64[:, None] * stride_vn + head * stride_vh + d_v[None, :] * stride_vd,
            mask=col_ok[:, None] & v_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Rows whose segment has no keys have l = 0 and acc = 0: they come out as 0.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_on + head * stride_oh + d_v[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
