"""Neighbour-guided reconstruction (NGR), optionally written into a full-length buffer and normalised.

``out[d] = base[d] + (1 / |valid|) * sum_{j valid} (kept - base_kept)[neighbors[d, j]]``

With ``k = 0`` the same kernel copies ``base`` rows, which is how kept rows reach a full-length
buffer (and its fused LayerNorm) in the same pass as the reconstructed ones.

``ngr_reconstruct_triton`` and ``ngr_restore_triton`` launch it and are the ``"triton"`` backends
of ``ngr_reconstruct`` and ``ngr_restore``.
"""

import torch
import triton
import triton.language as tl

from ..reference import ngr_reconstruct_reference, ngr_restore_reference
from ._backend import kernel_dtype, register_triton, row_major


@triton.jit
def ngr_reconstruct_kernel(
    base_ptr,
    kept_ptr,
    base_kept_ptr,
    neighbors_ptr,
    out_ptr,
    out_rows_ptr,
    normed_ptr,
    norm_weight_ptr,
    norm_bias_ptr,
    num_rows,
    dim,
    k,
    eps,
    stride_base,
    stride_kept,
    stride_base_kept,
    stride_neighbors,
    stride_out,
    stride_normed,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_OUT_ROWS: tl.constexpr,
    FUSE_NORM: tl.constexpr,
):
    # Rows are gathered (neighbour indices are arbitrary), so each row's feature dim is the
    # contiguous axis (unit stride checked by the launcher) and one program owns BLOCK_N rows x
    # BLOCK_D features. With FUSE_NORM, BLOCK_D covers the whole row so mean/variance are local.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    feat_ok = feats < dim
    mask = row_ok[:, None] & feat_ok[None, :]
    rows64 = rows.to(tl.int64)

    delta_sum = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_N], tl.float32)
    for j in range(0, k):
        neighbor = tl.load(neighbors_ptr + rows64 * stride_neighbors + j, mask=row_ok, other=-1).to(tl.int64)
        is_valid = neighbor >= 0
        gather_mask = mask & is_valid[:, None]
        kept = tl.load(kept_ptr + neighbor[:, None] * stride_kept + feats[None, :], mask=gather_mask, other=0.0)
        base_kept = tl.load(
            base_kept_ptr + neighbor[:, None] * stride_base_kept + feats[None, :], mask=gather_mask, other=0.0
        )
        delta_sum += kept.to(tl.float32) - base_kept.to(tl.float32)
        count += is_valid.to(tl.float32)

    base = tl.load(base_ptr + rows64[:, None] * stride_base + feats[None, :], mask=mask, other=0.0)
    # A row without any valid neighbour keeps its base (count clamped to 1 over a zero sum).
    value = (base.to(tl.float32) + delta_sum / tl.maximum(count, 1.0)[:, None]).to(base.dtype)

    dest = tl.load(out_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64) if HAS_OUT_ROWS else rows64
    tl.store(out_ptr + dest[:, None] * stride_out + feats[None, :], value, mask=mask)

    if FUSE_NORM:
        # LayerNorm of the stored (rounded) row, statistics in fp32 like torch's layer_norm.
        x = tl.where(mask, value.to(tl.float32), 0.0)
        mean = tl.sum(x, axis=1) / dim
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
        weight = tl.load(norm_weight_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)
        bias = tl.load(norm_bias_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)
        normed = centred * rstd[:, None] * weight[None, :] + bias[None, :]
        tl.store(normed_ptr + dest[:, None] * stride_normed + feats[None, :], normed.to(base.dtype), mask=mask)


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
    if not kernel_dtype(base_drop.dtype):
        return ngr_reconstruct_reference(base_drop, kept, base_kept, neighbors)
    base_drop, kept, base_kept = row_major(base_drop), row_major(kept), row_major(base_kept)
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
        out: ``[n, D]`` fp16/bf16/fp32 with unit last stride, written in place (fp64, an oracle
            dtype, runs the reference).
        kept: ``[Nk, D]`` current kept states; base_drop ``[Nd, D]``, base_kept ``[Nk, D]``: prune-layer
            states; all in ``out``'s dtype.
        keep, drop: int64 ``[Nk]`` / ``[Nd]`` row positions in ``out``.
        neighbors: int32/int64 ``[Nd, k]`` rows of ``kept`` (``-1`` = none).
        norm_weight, norm_bias: ``[D]`` or None (1 and 0); normed_out: ``[n, D]`` like ``out``, or None.
    """
    if out.stride(-1) != 1 or (normed_out is not None and normed_out.stride(-1) != 1):
        raise ValueError("out and normed_out need a unit stride on their last dim")
    if not kernel_dtype(out.dtype):
        args = (out, kept, base_drop, base_kept, keep, drop, neighbors, norm_weight, norm_bias, norm_eps, normed_out)
        return ngr_restore_reference(*args)
    weight = bias = None
    if normed_out is not None:
        dim = out.shape[1]
        weight = norm_weight.contiguous() if norm_weight is not None else out.new_ones(dim)
        bias = norm_bias.contiguous() if norm_bias is not None else out.new_zeros(dim)
    eps = float(norm_eps)
    kept, base_drop, base_kept = row_major(kept), row_major(base_drop), row_major(base_kept)
    neighbors = neighbors.contiguous()
    # Kept rows: the same kernel with no neighbours copies ``kept`` (and normalises it).
    no_neighbors = neighbors.new_empty((kept.shape[0], 0))
    _launch_reconstruct(kept, kept, kept, no_neighbors, out, keep, normed_out, weight, bias, eps)
    _launch_reconstruct(base_drop, kept, base_kept, neighbors, out, drop, normed_out, weight, bias, eps)


register_triton("ngr_reconstruct", ngr_reconstruct_triton)
register_triton("ngr_restore", ngr_restore_triton)
