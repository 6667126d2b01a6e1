"""A third-party token selector, as an outside library would ship it: the L1 norm of block
``P-1``'s change (instead of the L2 norm of the default ``"diff"``)."""

from __future__ import annotations

import torch

calls = 0  # forwards that scored with this selector (the tests check it ran where expected)


def l1_change(inputs) -> torch.Tensor:
    """``sum_d |x_P[j, d] - x_{P-1}[j, d]|`` in fp32 (fp64 for fp64 states): scores ``[n]``."""
    global calls
    calls += 1
    acc = torch.float64 if inputs.x_after.dtype == torch.float64 else torch.float32
    return (inputs.x_after.to(acc) - inputs.x_before.to(acc)).abs().sum(dim=-1)
