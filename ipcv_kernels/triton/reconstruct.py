"""Neighbour-guided reconstruction (NGR), optionally written into a full-length buffer and normalised.

``out[d] = base[d] + (1 / |valid|) * sum_{j valid} (kept - base_kept)[neighbors[d, j]]``

With ``k = 0`` the same kernel copies ``base`` rows, which is how kept rows reach a full-length
buffer (and its fused LayerNorm) in the same pass as the reconstructed ones.
"""

import triton
import triton.language as tl


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
