"""Input checks for the public boundary.

Every public op validates its arguments here, before any kernel runs, so that bad input raises a
``TypeError``/``ValueError`` naming the argument instead of crashing (or silently reading out of
bounds) deep inside a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of the given rank, dtype family and device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {value.device}")
    return value


def check_float(name: str, value: object, *, ndim: int, device: torch.device | None = None) -> torch.Tensor:
    return check_tensor(name, value, ndim=ndim, dtypes=FLOAT_DTYPES, device=device)


def check_cu_seqlens(name: str, value: object, *, total: int, device: torch.device) -> torch.Tensor:
    """Check a varlen offsets tensor: int32, 1-D, at least 2 entries, starts at 0, non-decreasing,
    ends at ``total``. Needs one host sync; it runs once per public call, never per tile."""
    cu = check_tensor(name, value, ndim=1, device=device)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 offsets, got {cu.dtype}")
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 offsets (one segment), got {cu.numel()}")
    if not cu.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    first, last = int(cu[0]), int(cu[-1])
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    if last != total:
        raise ValueError(f"{name} must end at the number of rows ({total}), got {last}")
    if cu.numel() > 2 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing (monotone offsets)")
    return cu


def check_same_dtype(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Check that ``value`` has the dtype of ``like`` (both already checked tensors)."""
    if value.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {value.dtype}")


def check_width(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Check that ``value`` has the trailing shape (all but the row dim) of ``like``."""
    if value.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"{name} must have trailing shape {tuple(like.shape[1:])} like {like_name}, got {tuple(value.shape)}"
        )


def check_paired_offsets(
    name_a: str, cu_a: object, rows_a: int, name_b: str, cu_b: object, rows_b: int, device: torch.device
) -> None:
    """Check two varlen offsets that pair segment ``b`` of one tensor with segment ``b`` of another:
    given together (or both ``None``), each valid for its row count, and of equal length."""
    if (cu_a is None) != (cu_b is None):
        raise ValueError(f"{name_a} and {name_b} must be given together (or both None)")
    if cu_a is None:
        return
    check_cu_seqlens(name_a, cu_a, total=rows_a, device=device)
    check_cu_seqlens(name_b, cu_b, total=rows_b, device=device)
    if cu_a.numel() != cu_b.numel():
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {cu_a.numel()} and {cu_b.numel()}")


def check_ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """Check an integer in ``[low, high)`` (``high=None``: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]
