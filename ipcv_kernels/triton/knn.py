"""Fused squared-distance + running top-k, segment-aware (the cuVS ``fusedL2Knn`` / FAISS WarpSelect idea).

One program owns ``BLOCK_Q`` query rows and walks the reference rows of their segments in tiles of
``BLOCK_R``. Each tile's distances live only in registers and are merged into a per-row list of
the ``k`` best so far, so no ``queries x refs`` distance matrix ever exists in memory.

``knn_triton`` launches it and is the ``"triton"`` backend of ``knn``.
"""

import torch
import triton
import triton.language as tl

from ..ops.vectorized_backend import segment_of_rows
from ..reference import knn_reference
from ._backend import dot_precision, kernel_dtype, register_triton

# The running top-k list lives in registers: beyond 32 slots it spills, so larger k uses the reference.
MAX_KERNEL_K = 32


@triton.jit
def knn_kernel(
    query_ptr,
    ref_ptr,
    query_segment_ptr,
    cu_ref_ptr,
    out_ptr,
    num_query,
    dim,
    k,
    stride_qn,
    stride_qd,
    stride_rn,
    stride_rd,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Ranking key: |r|^2 - 2 q.r, which orders refs like |q - r|^2 = |q|^2 + |r|^2 - 2 q.r because
    # |q|^2 is constant per query row. Products accumulate in fp32 from fp16/bf16/fp32 inputs.
    pid = tl.program_id(0)
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < num_query
    rows64 = rows.to(tl.int64)  # element offsets may exceed 2^31 for long packed inputs
    segment = tl.load(query_segment_ptr + rows, mask=row_ok, other=0)
    ref_start = tl.load(cu_ref_ptr + segment, mask=row_ok, other=0)
    ref_end = tl.load(cu_ref_ptr + segment + 1, mask=row_ok, other=0)
    # A tile may straddle segments: walk the union of its rows' ref ranges (contiguous, since
    # segments are laid out in order) and mask each row to its own range.
    lo = tl.min(tl.where(row_ok, ref_start, 2147483647), axis=0)
    hi = tl.max(ref_end, axis=0)

    slots = tl.arange(0, K_PAD)
    # Running list, unsorted: slots >= k hold -inf so they are never the "worst" and never replaced.
    best_dist = tl.where(slots[None, :] < k, float("inf"), float("-inf")) + tl.zeros([BLOCK_Q, K_PAD], tl.float32)
    best_index = tl.full([BLOCK_Q, K_PAD], -1, tl.int32)
    tile_cols = tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)

    for r0 in range(lo, hi, BLOCK_R):
        cols = r0 + tile_cols
        col_ok = cols < hi
        cols64 = cols.to(tl.int64)
        dot = tl.zeros([BLOCK_Q, BLOCK_R], tl.float32)
        ref_sq = tl.zeros([BLOCK_R], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + dims
            d_ok = d < dim
            q = tl.load(
                query_ptr + rows64[:, None] * stride_qn + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            r = tl.load(
                ref_ptr + cols64[:, None] * stride_rn + d[None, :] * stride_rd,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            dot = tl.dot(q, tl.trans(r), dot, input_precision=DOT_PRECISION)
            r32 = r.to(tl.float32)
            ref_sq += tl.sum(r32 * r32, axis=1)
        valid = (cols[None, :] >= ref_start[:, None]) & (cols[None, :] < ref_end[:, None])
        dist = tl.where(valid, ref_sq[None, :] - 2.0 * dot, float("inf"))

        # Merge: while some row's best tile candidate beats its current worst, replace the worst.
        # After the first few tiles almost no candidate qualifies, so this loop rarely iterates.
        cand = tl.min(dist, axis=1)
        need = cand < tl.max(best_dist, axis=1)
        while tl.max(need.to(tl.int32), axis=0) > 0:
            cand_col = tl.argmin(dist, axis=1)
            worst_slot = tl.argmax(best_dist, axis=1)
            replace = need[:, None] & (slots[None, :] == worst_slot[:, None])
            best_dist = tl.where(replace, cand[:, None], best_dist)
            best_index = tl.where(replace, (r0 + cand_col)[:, None], best_index)
            taken = need[:, None] & (tile_cols[None, :] == cand_col[:, None])
            dist = tl.where(taken, float("inf"), dist)
            cand = tl.min(dist, axis=1)
            need = cand < tl.max(best_dist, axis=1)

    # Emit nearest first: k rounds of selection over the K_PAD slots. Unfilled slots keep index -1.
    best_dist = tl.where(slots[None, :] < k, best_dist, float("inf"))
    for j in tl.static_range(K_PAD):
        pick = tl.argmin(best_dist, axis=1)
        picked = slots[None, :] == pick[:, None]
        index = tl.sum(tl.where(picked, best_index, 0), axis=1)
        tl.store(out_ptr + rows64 * k + j, index.to(tl.int64), mask=row_ok & (tl.full([BLOCK_Q], j, tl.int32) < k))
        best_dist = tl.where(picked, float("inf"), best_dist)
        best_index = tl.where(picked, -1, best_index)


def single_segment(num_query: int, num_ref: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``[2]`` offsets ``(cu_query, cu_ref)`` of one segment holding every row."""
    return (
        torch.tensor([0, num_query], dtype=torch.int32, device=device),
        torch.tensor([0, num_ref], dtype=torch.int32, device=device),
    )


def knn_triton(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    cu_query: torch.Tensor | None = None,
    cu_ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused distance + top-k; the ``knn`` op contract (int64 ``[Nq, k]``, nearest first, ``-1`` pad).

    Args:
        query: ``[Nq, D]`` fp16/bf16/fp32 (any strides); ref: ``[Nr, D]`` same dtype.
        k: neighbours per query; cu_query, cu_ref: optional int32 ``[B + 1]`` offsets.
    """
    if not kernel_dtype(query.dtype) or k > MAX_KERNEL_K:
        return knn_reference(query, ref, k, cu_query, cu_ref)
    num_query, dim = query.shape
    out = torch.full((num_query, k), -1, dtype=torch.int64, device=query.device)
    if num_query == 0 or ref.shape[0] == 0 or dim == 0:
        return out
    if cu_query is None:
        cu_query, cu_ref = single_segment(num_query, ref.shape[0], query.device)
    # From sm_90 compiles (tests/ops/test_triton_compile.py, Triton 3.6 and 3.9): 16-bit inputs take
    # 128-query tiles, which Hopper runs as warpgroup MMAs (32-query tiles compile to the older,
    # slower mma.sync) and which cut the re-reads of every reference tile 4x; 8 warps hold the
    # running top-k lists and the distance tile in registers without spills. fp32 operands (an FMA
    # dot, not tensor cores) take 32-query tiles and no software pipelining, which spilled under
    # Triton 3.6.
    fp32 = query.dtype == torch.float32
    block_q, block_r = (32 if fp32 else 128), 64
    block_d = max(16, min(32, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(num_query, block_q),)
    knn_kernel[grid](
        query,
        ref,
        segment_of_rows(cu_query, num_query),
        cu_ref,
        out,
        num_query,
        dim,
        k,
        query.stride(0),
        query.stride(1),
        ref.stride(0),
        ref.stride(1),
        BLOCK_Q=block_q,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        K_PAD=max(2, triton.next_power_of_2(k)),
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=8,
        num_stages=1 if fp32 else 3,
    )
    return out


register_triton("knn", knn_triton)
