"""Reference of the vision rotary embedding used by Qwen-VL towers."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last dim."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` computed in fp32 (fp64 for fp64), cast back to ``x``'s dtype.

    Args:
        x: ``[n, H, Dh]``.
        cos, sin: ``[n, Dh]`` (broadcast over heads).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    cos, sin = cos.unsqueeze(-2).to(acc), sin.unsqueeze(-2).to(acc)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
