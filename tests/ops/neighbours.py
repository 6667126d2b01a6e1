"""Checks of neighbour indices (``knn``, ``plan_ipcv``) against the reference: through their exact
fp64 distances, since ties may be broken either way."""

from __future__ import annotations

import torch

from ipcv_kernels.reference import knn_reference
from ipcv_kernels.testing import assert_close, tolerance


def neighbour_distances(query: torch.Tensor, ref: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exact fp64 squared distances of the chosen neighbours; 0 in ``-1`` slots."""
    q, r = query.double().cpu(), ref.double().cpu()
    index = index.cpu()
    chosen = r[index.clamp_min(0)]
    dist = ((q[:, None, :] - chosen) ** 2).sum(-1)
    return torch.where(index >= 0, dist, torch.zeros_like(dist))


def check_against_reference(got, query, ref, k, cu_query=None, cu_ref=None):
    """Same ``-1`` slots as the fp64 reference, every neighbour inside its segment, the same
    distances (fp32 tolerance: distances are computed in fp32 from the inputs' values), nearest first."""
    expected = knn_reference(query.double(), ref.double(), k, cu_query, cu_ref).cpu()
    assert got.dtype == torch.int64 and got.shape == (query.shape[0], k)
    got = got.cpu()
    torch.testing.assert_close(got == -1, expected == -1)
    if cu_query is not None:
        cu_query, cu_ref = cu_query.cpu(), cu_ref.cpu()
        seg = torch.searchsorted(cu_query, torch.arange(query.shape[0], dtype=torch.int32), right=True) - 1
        lo, hi = cu_ref[seg].long(), cu_ref[seg + 1].long()
        valid = got >= 0
        assert bool(((got >= lo[:, None]) & (got < hi[:, None]) | ~valid).all()), "a neighbour crossed its segment"
    d_got = neighbour_distances(query, ref, got)
    assert_close(d_got, neighbour_distances(query, ref, expected), dtype=torch.float32)
    assert bool((d_got[:, 1:] >= d_got[:, :-1] - 1e-4 * d_got[:, 1:].abs() - 1e-4)[got[:, 1:] >= 0].all())


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_same_neighbours(got, expected, query, ref, acc_dtype):
    """Same -1 slots; same distances within the accumulation dtype's tolerance; same indices on rows
    whose reference distances (k + 1 nearest) are separated by more than that tolerance."""
    got, expected = got.cpu(), expected.cpu()
    assert got.shape == expected.shape and got.dtype == torch.int64
    assert torch.equal(got < 0, expected < 0)
    d_got = neighbour_distances(query, ref, got)
    d_ref = neighbour_distances(query, ref, expected)
    assert_close(d_got, d_ref, dtype=acc_dtype)
    tol = tolerance(acc_dtype)
    gaps = d_ref.diff(dim=1)
    separated = ((gaps > tol.atol + tol.rtol * d_ref[:, 1:]) | (expected[:, 1:] < 0)).all(1)
    assert torch.equal(got[separated], expected[separated])
