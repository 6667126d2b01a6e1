"""``plan_ipcv``: the whole planning step (spec steps 2 and 3) in one call.

The public function, its input checks, the custom op ``ipcv_kernels::plan`` (and the fake of the
compiled ``ipcv::plan``) and its reference backend ``"torch"``.
"""

from __future__ import annotations

import torch

from .._validation import check_cu_seqlens, check_int, check_ratio
from ..reference import IPCVPlan, plan_reference
from ._custom_op import autograd_free, ipcv_op
from .dispatch import ALL_DEVICES, Backend, register_backend, resolve_backend
from .selection import check_score_inputs


@autograd_free
def plan_ipcv(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
    *,
    backend: str = "auto",
    skip_check: bool = False,
) -> IPCVPlan:
    """The whole planning step: scores, per-item selection, neighbours, kept attention offsets.

    Args:
        x_before: ``[n, D]`` fp16/bf16/fp32/fp64, input of block ``P-1``.
        x_after: ``[n, D]`` same dtype, output of block ``P-1`` (the spec's ``base``).
        cu_items: int32 ``[B + 1]`` item offsets: selection counts and neighbours are per item.
        cu_seqlens: int32 ``[S + 1]`` attention segments (e.g. one per video frame).
        ratio: fraction dropped, in ``[0, 1)``.
        num_neighbors: ``k >= 1``; each dropped token gets ``min(k, kept in its item)`` neighbours.
        backend: ``"auto"`` or a registered backend name.
        skip_check: skip the input checks (as ``ngr_attention``'s).

    Returns:
        ``IPCVPlan(keep, drop, cu_keep, cu_drop, neighbors, cu_seqlens_kept)``: int64 ``[Nk]`` /
        ``[Nd]`` ascending positions, int32 ``[B + 1]`` per-item offsets into them, int64
        ``[Nd, k]`` rows of ``keep`` (``-1`` = none) and int32 ``[S + 1]`` kept segment offsets.
    """
    if not skip_check:
        _check_plan_inputs(x_before, x_after, cu_items, cu_seqlens, ratio, num_neighbors)
    plan = plan_op(x_before, x_after, cu_items, cu_seqlens, float(ratio), num_neighbors, backend)
    return IPCVPlan(*plan)


def _check_plan_inputs(
    x_before: object, x_after: object, cu_items: object, cu_seqlens: object, ratio: object, num_neighbors: object
) -> None:
    check_score_inputs(x_before, x_after)
    check_cu_seqlens("cu_items", cu_items, total=x_after.shape[0], device=x_after.device)
    check_cu_seqlens("cu_seqlens", cu_seqlens, total=x_after.shape[0], device=x_after.device)
    check_ratio("ratio", ratio)
    check_int("num_neighbors", num_neighbors, low=1)


def _plan_fake(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kept_per_item: float | torch.Tensor,
    num_neighbors: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # kept_per_item: the ratio (ipcv_kernels::plan) or the int64 [B] keep counts (ipcv::plan);
    # the number kept depends on values either way: an unbacked size.
    num_keep = torch.library.get_ctx().new_dynamic_size()
    num_drop = x_after.shape[0] - num_keep
    return (
        x_after.new_empty((num_keep,), dtype=torch.int64),
        x_after.new_empty((num_drop,), dtype=torch.int64),
        torch.empty_like(cu_items),
        torch.empty_like(cu_items),
        x_after.new_empty((num_drop, num_neighbors), dtype=torch.int64),
        torch.empty_like(cu_seqlens),
    )


@ipcv_op("plan", fake=_plan_fake, compiled=True)
def plan_op(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = resolve_backend("plan", backend, x_after.device).fn
    return tuple(impl(x_before, x_after, cu_items, cu_seqlens, ratio, num_neighbors))


register_backend("plan", Backend("torch", plan_reference, ALL_DEVICES))
