"""Token selection (spec step 2): ``token_scores``, ``select_tokens`` and ``shrink_cu_seqlens``.

The public functions, their input checks, the custom op ``ipcv_kernels::select_tokens`` (and the
fake of the compiled ``ipcv::select_tokens``) and its reference backend ``"torch"``. Scores and
shrunk offsets are one vectorised PyTorch expression each, so they have no backends.
"""

from __future__ import annotations

import torch

from .._validation import check_cu_seqlens, check_float, check_ratio, check_tensor
from ..reference import (
    TokenSelection,
    select_tokens_reference,
    shrink_cu_seqlens_reference,
    token_scores_reference,
)
from ._custom_op import autograd_free, ipcv_op
from .dispatch import ALL_DEVICES, Backend, register_backend, resolve_backend


@autograd_free
def token_scores(x_before: torch.Tensor, x_after: torch.Tensor, *, skip_check: bool = False) -> torch.Tensor:
    """IPCV importance score ``||x_after[j] - x_before[j]||_2`` per token.

    Args:
        x_before: ``[n, D]`` fp16/bf16/fp32/fp64, the input of block ``P-1``.
        x_after: ``[n, D]`` same dtype family, its output (the input of block ``P``).
        skip_check: skip the input checks (uniform with the other ops; they are host-only here).

    Returns:
        ``[n]`` fp32 (fp64 for fp64 inputs).
    """
    if not skip_check:
        check_score_inputs(x_before, x_after)
    return token_scores_reference(x_before, x_after)


def check_score_inputs(x_before: object, x_after: object) -> None:
    """Check the two ``[n, D]`` states whose change scores the tokens (``token_scores``, ``plan_ipcv``)."""
    check_float("x_before", x_before, ndim=2)
    check_float("x_after", x_after, ndim=2, device=x_before.device)
    if x_after.shape != x_before.shape:
        raise ValueError(f"x_after must have the shape of x_before {tuple(x_before.shape)}, got {tuple(x_after.shape)}")


@autograd_free
def select_tokens(
    scores: torch.Tensor, cu_items: torch.Tensor, ratio: float, *, backend: str = "auto", skip_check: bool = False
) -> TokenSelection:
    """Per-item top-k token selection (spec step 2).

    Item ``b`` keeps its ``keep_count(n_b, ratio) = max(1, int(n_b * (1 - ratio)))`` highest-scoring
    tokens (an empty item keeps none).

    Args:
        scores: ``[n]`` fp16/bf16/fp32/fp64.
        cu_items: int32 ``[B + 1]`` item offsets (images / videos, or one item for global scope).
        ratio: fraction of tokens dropped, in ``[0, 1)``.
        backend: ``"auto"`` or a registered backend name.
        skip_check: skip the input checks (the offset checks read ``cu_items`` back to the host).
            Wrong inputs are then not caught.

    Returns:
        ``TokenSelection(keep, drop, cu_keep, cu_drop)``: ascending int64 positions ``[Nk]`` /
        ``[Nd]`` and int32 ``[B + 1]`` per-item offsets into them. Ties in ``scores`` are broken
        arbitrarily.
    """
    if not skip_check:
        check_float("scores", scores, ndim=1)
        check_cu_seqlens("cu_items", cu_items, total=scores.shape[0], device=scores.device)
        check_ratio("ratio", ratio)
    return TokenSelection(*select_tokens_op(scores, cu_items, float(ratio), backend))


@autograd_free
def shrink_cu_seqlens(cu_seqlens: torch.Tensor, keep: torch.Tensor, *, skip_check: bool = False) -> torch.Tensor:
    """Attention-segment offsets restricted to the kept tokens.

    Args:
        cu_seqlens: int32 ``[S + 1]`` offsets of the original segments.
        keep: int64 ``[Nk]`` ascending kept positions.
        skip_check: skip the input checks (uniform with the other ops; they are host-only here).

    Returns:
        int32 ``[S + 1]``; a segment left with no kept token becomes empty.
    """
    if not skip_check:
        check_tensor("keep", keep, ndim=1, dtypes=(torch.int64,))
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=keep.device)
    return shrink_cu_seqlens_reference(cu_seqlens, keep)


def _select_tokens_fake(
    scores: torch.Tensor, cu_items: torch.Tensor, kept_per_item: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # kept_per_item: the ratio (ipcv_kernels::select_tokens) or the int64 [B] keep counts
    # (ipcv::select_tokens). Either way how many tokens an item keeps depends on values: an
    # unbacked size.
    num_keep = torch.library.get_ctx().new_dynamic_size()
    keep = scores.new_empty((num_keep,), dtype=torch.int64)
    drop = scores.new_empty((scores.shape[0] - num_keep,), dtype=torch.int64)
    return keep, drop, torch.empty_like(cu_items), torch.empty_like(cu_items)


@ipcv_op("select_tokens", fake=_select_tokens_fake, compiled=True)
def select_tokens_op(
    scores: torch.Tensor, cu_items: torch.Tensor, ratio: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(resolve_backend("select_tokens", backend, scores.device).fn(scores, cu_items, ratio))


register_backend("select_tokens", Backend("torch", select_tokens_reference, ALL_DEVICES))
