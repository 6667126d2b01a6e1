"""Pure-PyTorch references of the built-in token selectors (``docs/spec.md`` §3 step 2, "Selectors").

Each reference maps the selector's inputs to fp32 scores ``[n]`` (fp64 for fp64 states; higher is
kept) one item / row at a time, as the spec words it. ``ipcv_kernels.selectors`` holds the
built-ins that the engine runs, tested against these.
"""

from __future__ import annotations

import hashlib
import itertools
import math

import torch

from .selection import token_scores_reference


def score_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype scores are accumulated and returned in: fp64 for fp64 states, fp32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def diff_scores_reference(x_before: torch.Tensor, x_after: torch.Tensor) -> torch.Tensor:
    """``"diff"``: ``||x_P[j] - x_{P-1}[j]||_2`` (the spec's step-2 score), ``[n, D]`` each ``-> [n]``."""
    return token_scores_reference(x_before, x_after)


def norm_scores_reference(x_after: torch.Tensor) -> torch.Tensor:
    """``"norm"``: ``||x_P[j]||_2``, ``[n, D] -> [n]``."""
    acc = score_dtype(x_after)
    return (
        torch.stack([row.to(acc).pow(2).sum().sqrt() for row in x_after])
        if len(x_after)
        else x_after.new_empty(0, dtype=acc)
    )


def random_item_seed(seed: int, length: int) -> int:
    """The generator seed of an item of ``length`` rows: the first 4 bytes (big-endian) of
    ``sha256(f"{seed}:{length}")``. It depends on nothing else of the call; 32 bits, since
    ``torch.Generator`` keeps no more of a CPU seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{length}".encode()).digest()[:4], "big")


def random_scores_reference(cu_items: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``"random"``: item ``b`` of ``n_b`` rows scores them with ``randperm(n_b)`` of a CPU
    ``torch.Generator`` seeded with ``random_item_seed(seed, n_b)``: distinct scores (no ties),
    reproducible, and an item's scores do not depend on the other items of the call."""
    parts = []
    for start, end in itertools.pairwise(cu_items.tolist()):
        generator = torch.Generator().manual_seed(random_item_seed(seed, end - start))
        parts.append(torch.randperm(end - start, generator=generator).to(dtype))
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def coarse_to_fine_key(row: int, col: int, bits: int) -> int:
    """The position of grid cell ``(row, col)`` in the coarse-to-fine order of a grid whose side
    fits in ``bits`` bits: the bits of ``row`` and ``col`` interleaved from the least significant
    one up (pair ``i`` = ``(bit_i(row), bit_i(col))`` has weight ``4^(bits - 1 - i)``). Cells on
    the stride-``2^s`` lattice come before every other cell, for every ``s``."""
    key = 0
    for i in range(bits):
        key = key * 4 + ((row >> i) & 1) * 2 + ((col >> i) & 1)
    return key


def uniform_scores_reference(
    cu_items: torch.Tensor, grid: torch.Tensor, pinned: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``"uniform"``: spatially even subsampling of each item's grid(s).

    Args:
        cu_items: int32 ``[B + 1]`` item offsets.
        grid: int64 ``[n, 3]``: ``(part, row, col)`` of every row (``part``: the call-wide index of
            the image / frame / tile / crop grid the row lies on; ``-1`` for rows off any grid).
        pinned: int64 ``[Np]`` rows never dropped (ignored here; their score is 0).
        dtype: the scores' dtype.

    A part's grid is ``H x W`` with ``H = 1 + max row`` and ``W = 1 + max col`` over its rows
    (pinned ones included); ``L = ceil(log2(max(H, W)))``. Each unpinned row gets
    ``frac = coarse_to_fine_key(row, col, L) / 4^L``. Within an item the unpinned rows are ranked
    by ``(frac, part, position)`` and score ``-rank``: the top ``k`` of any item are the coarsest
    lattice points of all its parts, in turn across parts.
    """
    n = grid.shape[0]
    pinned_set = set(pinned.tolist())
    rows = grid.tolist()
    sides: dict[int, int] = {}
    for part, row, col in rows:
        if part >= 0:
            sides[part] = max(sides.get(part, 1), row + 1, col + 1)
    scores = torch.zeros(n, dtype=dtype)
    for start, end in itertools.pairwise(cu_items.tolist()):
        order = []
        for j in range(start, end):
            if j in pinned_set:
                continue
            part, row, col = rows[j]
            if part < 0:
                raise ValueError(
                    f"the 'uniform' selector needs a grid position of every unpinned row; row {j} has none"
                )
            bits = math.ceil(math.log2(sides[part])) if sides[part] > 1 else 0
            order.append((coarse_to_fine_key(row, col, bits) / 4**bits, part, j))
        for rank, (_, _, j) in enumerate(sorted(order)):
            scores[j] = -rank
    return scores
