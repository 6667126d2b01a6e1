"""Pure-PyTorch reference for the whole IPCV planning step (spec steps 2 and 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .knn import knn_reference
from .selection import select_tokens_reference, shrink_cu_seqlens_reference, token_scores_reference


class IPCVPlan(NamedTuple):
    """Everything the blocks after the prune layer need, for ``n`` tokens in ``B`` items.

    keep, drop: int64 ascending positions (``[Nk]``, ``[Nd]``).
    cu_keep, cu_drop: int32 ``[B + 1]`` per-item offsets inside ``keep`` / ``drop``.
    neighbors: int64 ``[Nd, k]`` rows of ``keep`` (``-1`` = none), nearest first.
    cu_seqlens_kept: int32 ``[S + 1]`` the attention segments restricted to kept tokens.
    """

    keep: torch.Tensor
    drop: torch.Tensor
    cu_keep: torch.Tensor
    cu_drop: torch.Tensor
    neighbors: torch.Tensor
    cu_seqlens_kept: torch.Tensor


def plan_reference(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
) -> IPCVPlan:
    """Scores from block ``P-1``'s change, per-item selection, neighbours on ``base = x_after``."""
    scores = token_scores_reference(x_before, x_after)
    sel = select_tokens_reference(scores, cu_items, ratio)
    neighbors = knn_reference(x_after[sel.drop], x_after[sel.keep], num_neighbors, sel.cu_drop, sel.cu_keep)
    cu_kept = shrink_cu_seqlens_reference(cu_seqlens, sel.keep)
    return IPCVPlan(sel.keep, sel.drop, sel.cu_keep, sel.cu_drop, neighbors, cu_kept)
