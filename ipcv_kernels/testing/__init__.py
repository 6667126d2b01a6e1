"""The tiny-model kit: what this package's tests use, public for other compression libraries' tests.

Here: the one per-dtype tolerance table (and how it is derived) and the comparison of plans up to
near-ties. The submodules (not imported here; their factories need transformers):
``models`` — every family's tiny configs (random weights, no downloads), inputs and image
processors; ``processors`` — tokenizers and processors of the tiny models. The family table
(``ipcv_kernels.families``) points at them from each row, and its ``build_tower(id)`` /
``build_model(id)`` build a family's tiny tower or model.

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
from typing import Any

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


def plan_resolution(x: torch.Tensor, dtype: torch.dtype) -> float:
    """How finely a plan computed in ``dtype`` resolves scores and squared distances of rows like
    ``x`` (``[n, D]``), relative to the largest squared row norm (or row norm, for scores).

    A squared distance ``|q|^2 + |r|^2 - 2 q.r`` in ``dtype`` rounds each of its two norms and the
    ``D`` products of its dot product at ``eps(dtype)`` times ``max |x|^2``, so it is known to
    about ``(2 + sqrt(D)) * eps`` of that (the rounding errors of a sum of ``D`` terms grow as
    ``sqrt(D)``); the norm of a difference likewise. ``TOLERANCE_FACTOR`` times that is the
    resolution: two choices closer than it are a near-tie either plan may break either way.
    """
    return TOLERANCE_FACTOR * (2 + x.shape[-1] ** 0.5) * torch.finfo(dtype).eps


def assert_plans_agree(
    plan: Any, reference: Any, x_before: torch.Tensor, x_after: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> None:
    """Check a plan (``IPCVPlan``) computed in ``dtype`` against the fp64 one, up to near-ties.

    Plans are discrete: round-off may swap two tokens whose scores, or two neighbours whose
    distances, tie to within what ``dtype`` resolves (``plan_resolution``), and both choices are
    right. (fp32 nearest-neighbour search on rows of squared norm ~1.5 whose nearest squared
    distances are ~5e-5 swaps a few neighbours per hundred dropped tokens.) So:

    - the selection (``keep`` / ``drop`` and their offsets) must be the reference's, unless the
      tokens only one plan keeps have, sorted, the fp64 scores of those only the other keeps,
      within the resolution (then the neighbour sets are not comparable and the check ends);
    - each dropped token's neighbours must have, sorted, the fp64 squared distances of the
      reference's neighbours within the resolution, and as many of them.

    Args:
        plan, reference: plans of the same call (``reference`` from the fp64 model).
        x_before, x_after: ``[n, D]``, the reference's planning inputs (input of block ``P - 1``
            and of block ``P``, packed rows); compared in fp64.
        dtype: the dtype ``plan`` was computed in.
    """
    x_before, x_after = x_before.to(torch.float64).cpu(), x_after.to(torch.float64).cpu()
    resolution = plan_resolution(x_after, dtype)
    largest = (x_after**2).sum(-1).max().item()
    if not torch.equal(plan.keep.cpu(), reference.keep.cpu()):
        scores = (x_after - x_before).norm(dim=-1)
        ours, theirs = set(plan.keep.tolist()), set(reference.keep.tolist())
        only_ours = scores[sorted(ours - theirs)].sort().values
        only_theirs = scores[sorted(theirs - ours)].sort().values
        assert only_ours.shape == only_theirs.shape, "plans keep different token counts"
        gap = (only_ours - only_theirs).abs().max().item() / largest**0.5
        assert gap <= resolution, f"selections differ beyond near-ties (score gap {gap:.2e} > {resolution:.2e})"
        return
    for name in ("drop", "cu_keep", "cu_drop", "cu_seqlens_kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(reference, name).cpu()), f"plans differ in {name}"
    dropped, kept = x_after[reference.drop.cpu()], x_after[reference.keep.cpu()]

    def squared_distances(neighbors: torch.Tensor) -> torch.Tensor:
        neighbors = neighbors.cpu()
        dist = ((kept[neighbors.clamp_min(0)] - dropped[:, None, :]) ** 2).sum(-1)
        return torch.where(neighbors >= 0, dist, torch.full_like(dist, float("inf"))).sort(dim=1).values

    got, expected = squared_distances(plan.neighbors), squared_distances(reference.neighbors)
    finite = expected.isfinite()
    assert torch.equal(got.isfinite(), finite), "plans differ in how many neighbours a dropped token has"
    gap = (got[finite] - expected[finite]).abs().max().item() / largest if finite.any() else 0.0
    assert gap <= resolution, f"neighbours differ beyond near-ties (distance gap {gap:.2e} > {resolution:.2e})"
