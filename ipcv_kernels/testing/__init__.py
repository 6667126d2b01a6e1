"""Test and benchmark support: the one per-dtype tolerance table, and how it is derived.

The submodule ``ipcv_kernels.testing.models`` (not imported here; its factories need
transformers) is the other half: tiny Hugging Face Qwen2-VL towers and models with seeded random
weights, and inputs for them, used by the tests, the demo and the benchmarks.

Fast paths are compared with the fp64 reference. A kernel in dtype ``d`` cannot be more exact
than PyTorch's own implementation in ``d``, so the bound is a small multiple of that:

    |fast - ref64| <= TOLERANCE_FACTOR * |torch_d - ref64| + atol_floor(d)

``assert_close_to_reference`` measures the right-hand side at run time when given PyTorch's own
result in the same dtype (flash-attn's rule); ``TOLERANCES`` are the fixed fallbacks, set from the
unit round-off ``eps(d)`` times the accumulation depth of the ops we test (sums of at most a few
thousand terms in fp32 accumulators), for comparisons where no same-dtype PyTorch result exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# How much worse than PyTorch's own same-dtype error a fast path may be.
TOLERANCE_FACTOR = 4.0


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# eps: fp16 9.8e-4, bf16 7.8e-3, fp32 1.2e-7, fp64 2.2e-16. Values are rounded to their output
# dtype, so one rounding (0.5 eps) plus fp32 accumulation error (~sqrt(n) * 1.2e-7) bounds each.
# fp64 is used for whole-network comparisons (tens of chained GEMMs, softmaxes and LayerNorms on
# O(10) activations): round-off grows to ~1e6 eps there, still eight orders below any real bug.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-8, rtol=1e-7),
    torch.float32: Tolerance(atol=2e-5, rtol=2e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The table's fixed tolerance for ``dtype``."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: actual's)."""
    tol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=tol.atol, rtol=tol.rtol)


def assert_close_to_reference(
    actual: torch.Tensor, reference64: torch.Tensor, torch_same_dtype: torch.Tensor | None = None
) -> None:
    """Check a fast path against an fp64 reference, relative to PyTorch's own error in that dtype.

    Args:
        actual: the fast path's output (any float dtype).
        reference64: the same computation in fp64.
        torch_same_dtype: PyTorch's result in ``actual``'s dtype, if one exists.
    """
    ref = reference64.to(torch.float64)
    err = (actual.to(torch.float64) - ref).abs().max().item() if actual.numel() else 0.0
    floor = tolerance(actual.dtype).atol
    if torch_same_dtype is None:
        bound = floor + tolerance(actual.dtype).rtol * ref.abs().max().item() if ref.numel() else floor
    else:
        torch_err = (torch_same_dtype.to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
        bound = TOLERANCE_FACTOR * torch_err + floor
    assert err <= bound, f"max abs error {err:.3e} exceeds bound {bound:.3e} ({actual.dtype})"
