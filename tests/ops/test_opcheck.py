"""``torch.library.opcheck`` of the IPCV custom ops: schema, fake (meta) implementations, and
dispatch under tracing (data-dependent output sizes included), for every backend of each op
(``conftest.BACKENDS``); ``ngr_attention`` with and without its optional rotary / query gather. And
of the compiled ops ``torch.ops.ipcv.*`` of ``csrc/`` themselves (no ``backend`` argument)."""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

import ipcv_kernels  # noqa: F401  (registers torch.ops.ipcv_kernels.*)
from ipcv_kernels.ops import cpp_backend
from ipcv_kernels.reference import keep_counts

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


# Case name -> the op it calls; each runs once per backend of that op.
OPS = {
    "select_tokens": "select_tokens",
    "plan": "plan",
    "knn": "knn",
    "ngr_reconstruct": "ngr_reconstruct",
    "ngr_restore": "ngr_restore",
    "ngr_attention": "ngr_attention",
    "ngr_attention_rotary_gather": "ngr_attention",
    "ngr_attention_rotary_positions": "ngr_attention",
}


def test_opcheck(case, backend):
    op, args = op_cases(backend.device, backend.name)[case]
    torch.library.opcheck(op, args, test_utils=TEST_UTILS)


@pytest.fixture
def cpp():
    """The loaded extension (skips when this install has none)."""
    if cpp_backend.UNAVAILABLE_REASON is not None:
        pytest.skip(cpp_backend.UNAVAILABLE_REASON)
    return torch.ops.ipcv


def compiled_op_cases(device: torch.device):
    generator = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    cu_a, cu_b = offsets([3, 0, 4], device), offsets([5, 2, 6], device)
    neighbors = torch.tensor([[0, 2], [1, -1], [-1, -1], [3, 0]], device=device)
    x_before = randn(13, 8)
    x_after = x_before + randn(13, 8)
    return {
        "knn": (torch.ops.ipcv.knn, (randn(7, 8), randn(13, 8), 3, cu_a, cu_b)),
        "ngr_reconstruct": (torch.ops.ipcv.ngr_reconstruct, (randn(4, 8), randn(5, 8), randn(5, 8), neighbors)),
        "ngr_restore": (
            torch.ops.ipcv.ngr_restore,
            (
                randn(9, 8),
                randn(5, 8),
                randn(4, 8),
                randn(5, 8),
                torch.tensor([0, 2, 3, 6, 8], device=device),
                torch.tensor([1, 4, 5, 7], device=device),
                neighbors,
                randn(8),
                randn(8),
                1e-6,
                randn(9, 8),
            ),
        ),
        "select_tokens": (torch.ops.ipcv.select_tokens, (randn(13), cu_b, keep_counts(cu_b, 0.5))),
        "plan": (
            torch.ops.ipcv.plan,
            (x_before, x_after, cu_b, offsets([3, 2, 2, 6], device), keep_counts(cu_b, 0.5), 2),
        ),
    }


@pytest.mark.parametrize("name", ["knn", "ngr_reconstruct", "ngr_restore", "select_tokens", "plan"])
def test_opcheck_compiled_ops(cpp, name):
    op, args = compiled_op_cases(torch.device("cpu"))[name]
    torch.library.opcheck(op, args, test_utils=TEST_UTILS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["knn", "ngr_reconstruct", "select_tokens", "plan"])
def test_opcheck_compiled_ops_cuda(cpp, cuda_device, name):
    if not cpp_backend.has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    op, args = compiled_op_cases(cuda_device)[name]
    torch.library.opcheck(op, args, test_utils=TEST_UTILS)
