"""``torch.library.opcheck`` of the IPCV custom ops: schema, fake (meta) implementations, and
dispatch under tracing (data-dependent output sizes included), for the reference backend and the Triton
backend (interpreter or CUDA); ``ngr_attention`` with and without its optional rotary / query gather."""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

import ipcv_kernels  # noqa: F401  (registers torch.ops.ipcv_kernels.*)

# The ops are inference-only and register no autograd formula; inputs need no grad.
TEST_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def op_cases(device: torch.device, backend: str):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    cu_a, cu_b = offsets([3, 0, 4], device), offsets([5, 2, 6], device)
    neighbors = torch.tensor([[0, 2], [1, -1], [-1, -1], [3, 0]], device=device)
    q, k, v = randn(7, 2, 16), randn(13, 2, 16), randn(13, 2, 16)
    cos, sin = randn(13, 16), randn(13, 16)
    rows = torch.tensor([0, 2, 4, 5, 8, 9, 12], device=device)
    keep, drop = torch.tensor([1, 3, 4, 6, 8], device=device), torch.tensor([0, 2, 5, 7], device=device)
    restore_args = (randn(9, 8), randn(5, 8), randn(4, 8), randn(5, 8), keep, drop, neighbors)
    cu_items = offsets([5, 0, 4], device)
    return {
        "select_tokens": (torch.ops.ipcv_kernels.select_tokens, (randn(9), cu_items, 0.5, backend)),
        "plan": (
            torch.ops.ipcv_kernels.plan,
            (randn(9, 8), randn(9, 8), cu_items, offsets([3, 2, 4], device), 0.5, 2, backend),
        ),
        "knn": (torch.ops.ipcv_kernels.knn, (randn(7, 8), randn(13, 8), 3, cu_a, cu_b, backend)),
        "ngr_restore": (
            torch.ops.ipcv_kernels.ngr_restore,
            (*restore_args, randn(8), randn(8), 1e-6, randn(9, 8), backend),
        ),
        "ngr_reconstruct": (
            torch.ops.ipcv_kernels.ngr_reconstruct,
            (randn(4, 8), randn(5, 8), randn(5, 8), neighbors, backend),
        ),
        "ngr_attention": (
            torch.ops.ipcv_kernels.ngr_attention,
            (q, k, v, cu_a, cu_b, None, None, None, None, None, backend),
        ),
        # The one op with its optional steps: rotary with a query gather (fused by Triton, done
        # with PyTorch for the reference), and rotary at the positions of a compact q.
        "ngr_attention_rotary_gather": (
            torch.ops.ipcv_kernels.ngr_attention,
            (k, k, v, cu_a, cu_b, 0.25, cos, sin, rows, None, backend),
        ),
        "ngr_attention_rotary_positions": (
            torch.ops.ipcv_kernels.ngr_attention,
            (q, k, v, cu_a, cu_b, None, cos, sin, None, rows, backend),
        ),
    }


OPS = [
    "select_tokens",
    "plan",
    "knn",
    "ngr_reconstruct",
    "ngr_restore",
    "ngr_attention",
    "ngr_attention_rotary_gather",
    "ngr_attention_rotary_positions",
]


@pytest.mark.parametrize("name", OPS)
def test_opcheck_reference_backend(name):
    op, args = op_cases(torch.device("cpu"), "torch")[name]
    torch.library.opcheck(op, args, test_utils=TEST_UTILS)


@pytest.mark.parametrize("name", OPS)
def test_opcheck_triton_backend(triton_backends, name):
    op, args = op_cases(triton_backends, "triton")[name]
    torch.library.opcheck(op, args, test_utils=TEST_UTILS)
