"""Launchers of the Triton kernels and their registration as the ``"triton"`` backend of every op.

The kernels (``ipcv_kernels.triton``) take raw pointers and strides; this module chooses tiles
and grids, handles contiguity, and maps segments to rows on the device, so that no launcher reads
a device value on the host except ``select_tokens``, whose output sizes depend on the item
offsets (one small copy of ``cu_items``).

Registration: the ``"triton"`` backends run on ``"cuda"`` devices, where ``auto`` picks them. On
the CPU, Triton kernels only run under the interpreter (``TRITON_INTERPRET=1``, set before
``triton`` is imported): tests call the launchers below directly, or call
``register_triton_backends(("cuda", "cpu"))`` to route ``backend="triton"`` of the public ops
there (and ``register_triton_backends()`` afterwards to restore the CUDA-only table).

Dtypes: fp16/bf16/fp32 run the kernels; fp64 (an oracle dtype, no fast path needed) runs the
reference, as do ``knn`` with ``k > MAX_KERNEL_K`` and attention with ``Dh > MAX_HEAD_DIM``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import triton

from ..reference import (
    TokenSelection,
    keep_count,
    knn_reference,
    ngr_attention_reference,
    ngr_reconstruct_reference,
    shrink_cu_seqlens_reference,
    token_scores_reference,
)
from ..triton.attention import rotary_kernel, varlen_attention_kernel
from ..triton.knn import knn_kernel
from ..triton.reconstruct import ngr_reconstruct_kernel
from .attention_backends import unfused_attention_inputs
from .dispatch import Backend, register_backend

# The running top-k list lives in registers: beyond 32 slots it spills, so larger k uses the reference.
MAX_KERNEL_K = 32
# Above sdpa (10) and the library backends of attention_backends.py: ``auto`` on CUDA takes Triton.
TRITON_PRIORITY = 20
MAX_HEAD_DIM = 256
MAX_CHUNK = 128  # see head_dim_chunks


def _kernel_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (the default tf32 would lose ~3 decimal digits).
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit-stride last dim (gathered rows are then contiguous reads)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def segment_of_rows(cu_seqlens: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int32 ``[num_rows]``: the segment index of every row, on the device (no host sync).

    ``cu_seqlens``: int32 ``[B + 1]`` offsets. Row ``i`` lies in segment ``b`` with
    ``cu[b] <= i < cu[b + 1]``; empty segments are skipped by the right-sided search.
    """
    rows = torch.arange(num_rows, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens, rows, right=True) - 1).to(torch.int32)


def _single_segment(num_query: int, num_ref: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([0, num_query], dtype=torch.int32, device=device),
        torch.tensor([0, num_ref], dtype=torch.int32, device=device),
    )


# -- knn ----------------------------------------------------------------------------------------
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
    if not _kernel_dtype(query.dtype) or k > MAX_KERNEL_K:
        return knn_reference(query, ref, k, cu_query, cu_ref)
    num_query, dim = query.shape
    out = torch.full((num_query, k), -1, dtype=torch.int64, device=query.device)
    if num_query == 0 or ref.shape[0] == 0 or dim == 0:
        return out
    if cu_query is None:
        cu_query, cu_ref = _single_segment(num_query, ref.shape[0], query.device)
    # From sm_90 compiles (tests/test_triton_compile.py, Triton 3.6 and 3.9): 16-bit inputs take
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
        DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=8,
        num_stages=1 if fp32 else 3,
    )
    return out


# -- ngr_reconstruct ----------------------------------------------------------------------------
def _launch_reconstruct(
    base: torch.Tensor,
    kept: torch.Tensor,
    base_kept: torch.Tensor,
    neighbors: torch.Tensor,
    out: torch.Tensor,
    out_rows: torch.Tensor | None,
    normed: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
) -> None:
    num_rows, dim = base.shape
    if num_rows == 0:
        return
    fuse_norm = normed is not None
    if fuse_norm:
        # The LayerNorm statistics need the whole row in one program.
        block_d = triton.next_power_of_2(dim)
        block_n = max(1, min(8, 4096 // block_d))
    else:
        block_d = min(256, triton.next_power_of_2(dim))
        block_n = 8
    grid = (triton.cdiv(num_rows, block_n), triton.cdiv(dim, block_d))
    ngr_reconstruct_kernel[grid](
        base,
        kept,
        base_kept,
        neighbors,
        out,
        out_rows if out_rows is not None else neighbors,
        normed if fuse_norm else out,
        norm_weight if fuse_norm else out,
        norm_bias if fuse_norm else out,
        num_rows,
        dim,
        neighbors.shape[1],
        eps,
        base.stride(0),
        kept.stride(0),
        base_kept.stride(0),
        neighbors.stride(0),
        out.stride(0),
        normed.stride(0) if fuse_norm else 0,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_OUT_ROWS=out_rows is not None,
        FUSE_NORM=fuse_norm,
        num_warps=4,
    )


def ngr_reconstruct_triton(
    base_drop: torch.Tensor, kept: torch.Tensor, base_kept: torch.Tensor, neighbors: torch.Tensor
) -> torch.Tensor:
    """The ``ngr_reconstruct`` op: ``[Nd, D]`` in ``base_drop``'s dtype (see the reference)."""
    if not _kernel_dtype(base_drop.dtype):
        return ngr_reconstruct_reference(base_drop, kept, base_kept, neighbors)
    base_drop, kept, base_kept = _row_major(base_drop), _row_major(kept), _row_major(base_kept)
    neighbors = neighbors.contiguous()
    out = torch.empty_like(base_drop, memory_format=torch.contiguous_format)
    _launch_reconstruct(base_drop, kept, base_kept, neighbors, out, None, None, None, None, 0.0)
    return out


def ngr_restore_triton(
    out: torch.Tensor,
    kept: torch.Tensor,
    base_drop: torch.Tensor,
    base_kept: torch.Tensor,
    keep: torch.Tensor,
    drop: torch.Tensor,
    neighbors: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    normed_out: torch.Tensor | None = None,
) -> None:
    """The ``ngr_restore`` op (see ``ngr_restore_reference``) in one kernel pass per row set.

    ``out[keep] = kept`` and ``out[drop] = NGR reconstruction`` are written straight into the
    full-length buffer (no temporary for the reconstructed rows, no scatter); with ``normed_out``,
    ``normed_out = layer_norm(out)`` in the same pass, so the next block's K/V projection reads the
    normalised full sequence directly.

    Args:
        out: ``[n, D]`` fp16/bf16/fp32 with unit last stride, written in place.
        kept: ``[Nk, D]`` current kept states; base_drop ``[Nd, D]``, base_kept ``[Nk, D]``: prune-layer
            states; all in ``out``'s dtype.
        keep, drop: int64 ``[Nk]`` / ``[Nd]`` row positions in ``out``.
        neighbors: int32/int64 ``[Nd, k]`` rows of ``kept`` (``-1`` = none).
        norm_weight, norm_bias: ``[D]`` or None (1 and 0); normed_out: ``[n, D]`` like ``out``, or None.
    """
    if out.stride(-1) != 1 or (normed_out is not None and normed_out.stride(-1) != 1):
        raise ValueError("out and normed_out need a unit stride on their last dim")
    weight = bias = None
    if normed_out is not None:
        dim = out.shape[1]
        weight = norm_weight.contiguous() if norm_weight is not None else out.new_ones(dim)
        bias = norm_bias.contiguous() if norm_bias is not None else out.new_zeros(dim)
    eps = float(norm_eps)
    kept, base_drop, base_kept = _row_major(kept), _row_major(base_drop), _row_major(base_kept)
    neighbors = neighbors.contiguous()
    # Kept rows: the same kernel with no neighbours copies ``kept`` (and normalises it).
    no_neighbors = neighbors.new_empty((kept.shape[0], 0))
    _launch_reconstruct(kept, kept, kept, no_neighbors, out, keep, normed_out, weight, bias, eps)
    _launch_reconstruct(base_drop, kept, base_kept, neighbors, out, drop, normed_out, weight, bias, eps)


# -- ngr_attention ------------------------------------------------------------------------------
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

    Chosen from compiling for sm_90 without a GPU (``tests/test_triton_compile.py`` keeps them
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
        x: ``[N, H, Dh]`` fp16/bf16/fp32, any strides, ``Dh`` even.
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
        q: ``[Nq, H, Dh]``, or with ``q_rows`` a full-length ``[N, H, Dh]`` to gather from; any strides.
        k, v: ``[Nk, H, Dh]`` same dtype (fp16/bf16/fp32), any strides; ``Dh <= 256``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` (``cu_seqlens_q`` counts the attending queries).
        softmax_scale: defaults to ``Dh ** -0.5``.
        rotary: ``(cos, sin)``, each ``[Nk, Dh]``: row ``j`` rotates key row ``j``; queries use the
            rows ``q_rows`` / ``q_positions`` (or row ``i`` when neither is given). ``Dh`` even.
            ``rotate_rows_triton`` writes the rotated queries (kept rows only) and keys first.
        q_rows: int64 ``[Nq']``: the queries are ``q[q_rows]``; gathered inside the kernel (or by the
            rotary pass), so no copy of the full-length q is made.
        q_positions: int64 ``[Nq]``: rotary rows of a compact ``q`` (mutually exclusive with q_rows).

    Returns:
        ``[Nq', H, Dh]`` contiguous, in ``q``'s dtype; rows of a segment with no keys are 0.
    """
    if q_rows is not None and q_positions is not None:
        raise ValueError("q_rows and q_positions are mutually exclusive")
    head_dim = q.shape[-1]
    if not _kernel_dtype(q.dtype) or head_dim > MAX_HEAD_DIM:
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
        cos, sin = (_row_major(t) for t in rotary)
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
        DOT_PRECISION=_dot_precision(q.dtype),
        **config,
    )
    return out


def ngr_attention_fused_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_rows: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``ngr_attention_triton`` with the fused options as positional arguments (the custom op's schema)."""
    rotary = None if cos is None else (cos, sin)
    return ngr_attention_triton(
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, rotary=rotary, q_rows=q_rows, q_positions=q_positions
    )


# -- selection and planning ---------------------------------------------------------------------
def select_tokens_device(scores: torch.Tensor, cu_items: torch.Tensor, ratio: float) -> TokenSelection:
    """Per-item top-k on the device with vectorised PyTorch ops (no per-item loop, no kernel of its own).

    One small host read of ``cu_items`` (the output sizes depend on it); everything else stays on
    the device: a segmented descending sort (sort by score, then stably by item), each token's rank
    in its item, ``rank < keep_count`` as the keep mask, and fixed-size ``nonzero_static`` for the
    ascending keep/drop positions.
    """
    num = scores.shape[0]
    bounds = cu_items.tolist()
    counts = [keep_count(b1 - b0, ratio) for b0, b1 in itertools.pairwise(bounds)]
    num_keep = sum(counts)
    device = scores.device
    item = segment_of_rows(cu_items, num).long()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(item[order], stable=True)]
    rank = torch.empty(num, dtype=torch.int64, device=device)
    rank[order] = torch.arange(num, device=device) - cu_items.long()[item[order]]
    is_kept = rank < torch.tensor(counts, dtype=torch.int64, device=device)[item]
    keep = torch.nonzero_static(is_kept, size=num_keep).squeeze(1)
    drop = torch.nonzero_static(~is_kept, size=num - num_keep).squeeze(1)
    cu_keep = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0).to(torch.int32)
    lengths = [b1 - b0 for b0, b1 in itertools.pairwise(bounds)]
    cu_drop = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32) - cu_keep
    return TokenSelection(keep, drop, cu_keep.to(device), cu_drop.to(device))


def plan_triton(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
) -> tuple[torch.Tensor, ...]:
    """The ``plan`` op on the device: scores, ``select_tokens_device``, ``knn_triton``, shrunk offsets."""
    scores = token_scores_reference(x_before, x_after)
    sel = select_tokens_device(scores, cu_items, ratio)
    neighbors = knn_triton(x_after[sel.drop], x_after[sel.keep], num_neighbors, sel.cu_drop, sel.cu_keep)
    cu_kept = shrink_cu_seqlens_reference(cu_seqlens, sel.keep)
    return sel.keep, sel.drop, sel.cu_keep, sel.cu_drop, neighbors, cu_kept


def register_triton_backends(device_types: Sequence[str] = ("cuda",)) -> None:
    """(Re-)register the ``"triton"`` backend of every op for ``device_types``.

    Import registers them for CUDA. ``("cuda", "cpu")`` is for tests under ``TRITON_INTERPRET=1``
    only: ``auto`` on the CPU would then pick the (slow) interpreter too.
    """
    devices = tuple(device_types)
    for op, fn in (
        ("knn", knn_triton),
        ("ngr_reconstruct", ngr_reconstruct_triton),
        ("ngr_restore", ngr_restore_triton),
        ("ngr_attention", ngr_attention_triton),
        ("ngr_attention_fused", ngr_attention_fused_triton),
        ("select_tokens", select_tokens_device),
        ("plan", plan_triton),
    ):
        register_backend(op, Backend("triton", fn, devices, priority=TRITON_PRIORITY))


register_triton_backends()
