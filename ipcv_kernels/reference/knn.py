"""Pure-PyTorch reference for segment-aware k-nearest-neighbour search (spec step 3)."""

from __future__ import annotations

import torch

# Query rows handled per distance tile: bounds the reference's memory to QUERY_TILE x |ref segment|.
QUERY_TILE = 2048


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs (the spec's "fp32 or better"), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def squared_distances(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``|q|^2 + |r|^2 - 2 q.r`` in fp32 (fp64 for fp64 inputs): ``[Nq, D] x [Nr, D] -> [Nq, Nr]``."""
    acc = accumulation_dtype(query.dtype)
    q, r = query.to(acc), ref.to(acc)
    dist = (q * q).sum(1, keepdim=True) + (r * r).sum(1)[None, :] - 2.0 * (q @ r.T)
    return dist.clamp_min_(0.0)


def knn_reference(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    cu_query: torch.Tensor | None = None,
    cu_ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``k`` nearest ``ref`` rows of every ``query`` row, nearest first.

    Args:
        query: ``[Nq, D]`` float.
        ref: ``[Nr, D]`` float, same dtype.
        k: neighbours per query, ``>= 1``.
        cu_query, cu_ref: int32 ``[B + 1]`` offsets; query segment ``b`` searches only ref segment
            ``b``. ``None`` for both means one segment.

    Returns:
        int64 ``[Nq, k]`` global row indices into ``ref``; ``-1`` where the segment has fewer than
        ``k`` ref rows. Ties are broken arbitrarily.
    """
    out = torch.full((query.shape[0], k), -1, dtype=torch.int64, device=query.device)
    if cu_query is None:
        bounds = [(0, query.shape[0], 0, ref.shape[0])]
    else:
        cq, cr = cu_query.tolist(), cu_ref.tolist()
        bounds = [(cq[b], cq[b + 1], cr[b], cr[b + 1]) for b in range(len(cq) - 1)]
    for q0, q1, r0, r1 in bounds:
        kk = min(k, r1 - r0)
        if q1 == q0 or kk == 0:
            continue
        for t0 in range(q0, q1, QUERY_TILE):
            t1 = min(t0 + QUERY_TILE, q1)
            dist = squared_distances(query[t0:t1], ref[r0:r1])
            out[t0:t1, :kk] = dist.topk(kk, dim=1, largest=False, sorted=True).indices + r0
    return out
