"""The ``"triton"`` backend of ``select_tokens``: per-item top-k on the device with vectorised
PyTorch ops (no per-item loop and no kernel of its own), so that planning on CUDA never leaves the
device but for one read of the item offsets."""

from __future__ import annotations

import itertools

import torch

from ..reference import TokenSelection, keep_count
from ._backend import register_triton, segment_of_rows


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


register_triton("select_tokens", select_tokens_device)
