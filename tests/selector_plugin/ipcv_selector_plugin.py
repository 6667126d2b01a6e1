"""Third-party token selectors, as an outside library would ship them: ``l1_change``, the L1 norm
of block ``P-1``'s change (instead of the L2 norm of the default ``"diff"``), and
``logged_change``, the default's L2 norm that also appends each call's row count to the file
named by ``IPCV_SELECTOR_PLUGIN_LOG`` (one line per planned tower call: how a test sees, from
outside a server process, which images were encoded)."""

from __future__ import annotations

import os

import torch

LOG_VARIABLE = "IPCV_SELECTOR_PLUGIN_LOG"

calls = 0  # forwards that scored with this selector (the tests check it ran where expected)


def l1_change(inputs) -> torch.Tensor:
    """``sum_d |x_P[j, d] - x_{P-1}[j, d]|`` in fp32 (fp64 for fp64 states): scores ``[n]``."""
    global calls
    calls += 1
    acc = torch.float64 if inputs.x_after.dtype == torch.float64 else torch.float32
    return (inputs.x_after.to(acc) - inputs.x_before.to(acc)).abs().sum(dim=-1)


def logged_change(inputs) -> torch.Tensor:
    """``||x_P[j] - x_{P-1}[j]||_2`` in fp32 (fp64 for fp64 states): scores ``[n]``; appends ``n``
    to the file of ``IPCV_SELECTOR_PLUGIN_LOG`` when it is set."""
    log = os.environ.get(LOG_VARIABLE)
    if log:
        with open(log, "a") as file:
            file.write(f"{inputs.x_after.shape[0]}\n")
    acc = torch.float64 if inputs.x_after.dtype == torch.float64 else torch.float32
    return (inputs.x_after.to(acc) - inputs.x_before.to(acc)).norm(dim=-1)
