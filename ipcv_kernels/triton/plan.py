"""The ``"triton"`` backend of ``plan``: the planning step on the device, from the Triton ``knn``
and the device-side selection."""

from __future__ import annotations

import torch

from ..reference import shrink_cu_seqlens_reference, token_scores_reference
from ._backend import register_triton
from .knn import knn_triton
from .selection import select_tokens_device


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


register_triton("plan", plan_triton)
