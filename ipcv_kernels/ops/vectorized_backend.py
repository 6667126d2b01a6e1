"""``backend="vectorized"``: token selection and the planning step on the tensors' device, written
as vectorised PyTorch (no per-item loop, no kernel of their own), for ``select_tokens`` and
``plan``.

The references loop over items on the host; here every step is a whole-tensor op, so that planning
on CUDA never leaves the device but for one small read of the item offsets (the output sizes
depend on them). ``auto`` takes it on CUDA, above the compiled ``cpp`` ops and below nothing
else that provides these ops; on the CPU it runs only when named (``dispatch.AUTO_ORDER``).
"""

from __future__ import annotations

import itertools

import torch

from ..reference import IPCVPlan, TokenSelection, keep_count, shrink_cu_seqlens_reference, token_scores_reference
from .dispatch import ALL_DEVICES, Backend, register_backend, resolve_backend


def segment_of_rows(cu_seqlens: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int32 ``[num_rows]``: the segment index of every row, on the device (no host sync).

    ``cu_seqlens``: int32 ``[B + 1]`` offsets. Row ``i`` lies in segment ``b`` with
    ``cu[b] <= i < cu[b + 1]``; empty segments are skipped by the right-sided search.
    """
    rows = torch.arange(num_rows, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens, rows, right=True) - 1).to(torch.int32)


def select_tokens_vectorized(scores: torch.Tensor, cu_items: torch.Tensor, ratio: float) -> TokenSelection:
    """Per-item top-k (see ``select_tokens_reference`` for the contract) with whole-tensor ops.

    One small host read of ``cu_items``; everything else stays on the device: a segmented
    descending sort (sort by score, then stably by item), each token's rank in its item,
    ``rank < keep_count`` as the keep mask, and fixed-size ``nonzero_static`` for the ascending
    keep / drop positions.
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


def plan_vectorized(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
) -> IPCVPlan:
    """The planning step (see ``plan_reference``): scores, ``select_tokens_vectorized``, the
    neighbours from ``knn``'s ``auto`` backend on the device (Triton's on CUDA), shrunk offsets."""
    scores = token_scores_reference(x_before, x_after)
    sel = select_tokens_vectorized(scores, cu_items, ratio)
    knn = resolve_backend("knn", "auto", x_after.device).fn
    neighbors = knn(x_after[sel.drop], x_after[sel.keep], num_neighbors, sel.cu_drop, sel.cu_keep)
    cu_kept = shrink_cu_seqlens_reference(cu_seqlens, sel.keep)
    return IPCVPlan(sel.keep, sel.drop, sel.cu_keep, sel.cu_drop, neighbors, cu_kept)


register_backend("select_tokens", Backend("vectorized", select_tokens_vectorized, ALL_DEVICES))
register_backend("plan", Backend("vectorized", plan_vectorized, ALL_DEVICES))
