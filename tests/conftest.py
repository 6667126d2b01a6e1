"""Shared fixtures. Nothing here touches a device at import or collection time."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device, or a clean skip (evaluated when the test runs, not at collection)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def offsets(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 ``cu_seqlens`` for segment ``lengths``."""
    return torch.tensor([0, *lengths], dtype=torch.int64, device=device).cumsum(0).to(torch.int32)
