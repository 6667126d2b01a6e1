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
smaller tiles (sm_90 compiles in ``tests/test_triton_compile.py``).
"""

import triton
import triton.language as tl


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
