"""Device-side selection and planning of the ``"triton"`` backend, and the public ops routed to it.

Scores are random floats (no ties), so keep/drop sets compare exactly; neighbours compare
through their distances.
"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

pytest.importorskip("triton")

import ipcv_kernels as ik
from ipcv_kernels.ops.vectorized_backend import plan_vectorized as plan_triton
from ipcv_kernels.ops.vectorized_backend import select_tokens_vectorized as select_tokens_device
from ipcv_kernels.reference import plan_reference, select_tokens_reference
from ipcv_kernels.reference.knn import squared_distances
from ipcv_kernels.testing import assert_close

ITEM_LENGTHS = [9, 0, 1, 30, 2]


def test_select_tokens_device_matches_reference():
    cu_items = offsets(ITEM_LENGTHS)
    scores = torch.rand(sum(ITEM_LENGTHS), generator=torch.Generator().manual_seed(0))
    for ratio in (0.0, 0.5, 0.65, 0.99):
        got, expected = select_tokens_device(scores, cu_items, ratio), select_tokens_reference(scores, cu_items, ratio)
        for name, value, reference in zip(got._fields, got, expected, strict=True):
            assert torch.equal(value, reference), name


def neighbour_distances(base, plan):
    """Per dropped token, its distances (on ``base``) to its neighbours; -1 slots give 0."""
    dist = squared_distances(base[plan.drop], base[plan.keep]).double()
    picked = dist.gather(1, plan.neighbors.clamp_min(0))
    return torch.where(plan.neighbors >= 0, picked, torch.zeros_like(picked))


def test_plan_matches_reference(triton_device):
    generator = torch.Generator().manual_seed(1)
    x_before = torch.randn(42, 24, generator=generator).to(triton_device)
    x_after = torch.randn(42, 24, generator=generator).to(triton_device)
    cu_items, cu_seqlens = offsets(ITEM_LENGTHS, triton_device), offsets([5, 4, 1, 12, 18, 2], triton_device)
    got = ik.IPCVPlan(*plan_triton(x_before, x_after, cu_items, cu_seqlens, 0.65, 4))
    expected = plan_reference(x_before, x_after, cu_items, cu_seqlens, 0.65, 4)
    for name in ("keep", "drop", "cu_keep", "cu_drop", "cu_seqlens_kept"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    torch.testing.assert_close(got.neighbors == -1, expected.neighbors == -1)
    assert_close(neighbour_distances(x_after, got), neighbour_distances(x_after, expected), dtype=torch.float32)


def test_public_ops_route_to_triton(triton_backends):
    device = triton_backends
    assert ik.ops.backend_for("knn", "triton", device) == "triton"
    generator = torch.Generator().manual_seed(2)
    ref = torch.randn(20, 8, generator=generator).to(device)
    got = ik.knn(ref[:5] + 0.01, ref, 3, backend="vectorized")
    assert got[:, 0].tolist() == [0, 1, 2, 3, 4]
    q, k, v = (torch.randn(n, 2, 16, generator=generator).to(device) for n in (6, 10, 10))
    cu_q, cu_k = offsets([6], device), offsets([10], device)
    torch.testing.assert_close(
        ik.ngr_attention(q, k, v, cu_q, cu_k, backend="triton"), ik.ngr_attention(q, k, v, cu_q, cu_k, backend="torch")
    )
    sel = ik.select_tokens(
        torch.rand(12, generator=generator).to(device), offsets([12], device), 0.5, backend="vectorized"
    )
    assert sel.keep.numel() == 6


def test_cpu_registration_is_cuda_only_by_default():
    # Importing the package must not make the interpreter the CPU default.
    assert "triton" not in ik.available_backends("knn", torch.device("cpu"))
    assert ik.available_backends("ngr_attention", torch.device("cuda"))[0] == "triton"
    assert ik.available_backends("knn", torch.device("cuda"))[0] == "triton"
