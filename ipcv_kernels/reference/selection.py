"""Pure-PyTorch reference for IPCV token selection (spec step 2)."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch


class TokenSelection(NamedTuple):
    """Result of selection, for ``n`` tokens in ``B`` items.

    keep: int64 ``[Nk]`` kept token positions, ascending (so per item, in position order).
    drop: int64 ``[Nd]`` dropped token positions, ascending (``Nd = n - Nk``).
    cu_keep: int32 ``[B + 1]`` offsets of each item's kept tokens inside ``keep``.
    cu_drop: int32 ``[B + 1]`` offsets of each item's dropped tokens inside ``drop``.
    """

    keep: torch.Tensor
    drop: torch.Tensor
    cu_keep: torch.Tensor
    cu_drop: torch.Tensor


def keep_count(num_tokens: int, ratio: float) -> int:
    """The spec's count ``max(1, int(n * (1 - r)))`` in Python float math; 0 for an empty item."""
    return min(num_tokens, max(1, int(num_tokens * (1 - ratio))))


def keep_counts(cu_items: torch.Tensor, ratio: float) -> torch.Tensor:
    """``keep_count`` of every item: int32 ``[B + 1]`` item offsets in (one host read), int64 ``[B]``
    on the CPU out. The compiled ops (``csrc/``) take these counts, so the rule exists only here."""
    lengths = [end - start for start, end in itertools.pairwise(cu_items.tolist())]
    return torch.tensor([keep_count(n, ratio) for n in lengths], dtype=torch.int64)


def token_scores_reference(x_before: torch.Tensor, x_after: torch.Tensor) -> torch.Tensor:
    """``score[j] = || x_after[j] - x_before[j] ||_2`` in fp32 (fp64 for fp64): ``[n, D] -> [n]``."""
    acc = torch.float64 if x_after.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x_after.to(acc) - x_before.to(acc), dim=-1)


def select_tokens_reference(scores: torch.Tensor, cu_items: torch.Tensor, ratio: float) -> TokenSelection:
    """Keep the ``keep_count(n_b, ratio)`` highest-scoring tokens of every item ``b``.

    Args:
        scores: float ``[n]``.
        cu_items: int32 ``[B + 1]`` item offsets.
        ratio: fraction dropped, in ``[0, 1)``.
    """
    keeps, drops, n_keep, n_drop = [], [], [0], [0]
    bounds = cu_items.tolist()
    for b in range(len(bounds) - 1):
        s0, s1 = bounds[b], bounds[b + 1]
        count = keep_count(s1 - s0, ratio)
        is_kept = torch.zeros(s1 - s0, dtype=torch.bool, device=scores.device)
        is_kept[scores[s0:s1].topk(count).indices] = True
        positions = torch.arange(s0, s1, device=scores.device)
        keeps.append(positions[is_kept])
        drops.append(positions[~is_kept])
        n_keep.append(n_keep[-1] + count)
        n_drop.append(n_drop[-1] + (s1 - s0 - count))
    empty = torch.empty(0, dtype=torch.int64, device=scores.device)
    return TokenSelection(
        keep=torch.cat(keeps) if keeps else empty,
        drop=torch.cat(drops) if drops else empty,
        cu_keep=torch.tensor(n_keep, dtype=torch.int32, device=scores.device),
        cu_drop=torch.tensor(n_drop, dtype=torch.int32, device=scores.device),
    )


def shrink_cu_seqlens_reference(cu_seqlens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Offsets of the attention segments restricted to the kept tokens.

    ``keep`` is ascending, so the number of kept tokens before offset ``c`` is a binary search.
    int32 ``[S + 1]`` in, int32 ``[S + 1]`` out; a segment may become empty.
    """
    return torch.searchsorted(keep, cu_seqlens.to(keep.dtype)).to(torch.int32)
