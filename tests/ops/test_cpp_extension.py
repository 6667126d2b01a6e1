"""The compiled ops of ``csrc/`` (``torch.ops.ipcv.*``) called directly: their own boundary checks,
which name the argument. (As backend ``"cpp"`` they are tested with every other backend in each
op's module; their ``opcheck`` is in ``test_opcheck.py``.)"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

from ipcv_kernels.ops import cpp_backend
from ipcv_kernels.reference import keep_counts


@pytest.fixture
def cpp():
    """The loaded extension (skips when this install has none)."""
    if cpp_backend.UNAVAILABLE_REASON is not None:
        pytest.skip(cpp_backend.UNAVAILABLE_REASON)
    return torch.ops.ipcv


def test_boundary_checks_name_the_argument(cpp):
    x, cu = torch.randn(6, 4), offsets([6])
    counts = keep_counts(cu, 0.5)
    cases = [
        (lambda: cpp.knn(x.long(), x, 2), "query must be fp16/bf16/fp32/fp64"),
        (lambda: cpp.knn(x, torch.randn(6, 5), 2), "ref must have 4 columns"),
        (lambda: cpp.knn(x, x, 0), "k must be >= 1"),
        (lambda: cpp.knn(x, x, 2, cu, None), "given together"),
        (lambda: cpp.knn(x, x, 2, cu.long(), cu), "cu_query must be int32"),
        (lambda: cpp.knn(x, x, 2, torch.tensor([0, 4, 2, 6], dtype=torch.int32), offsets([2, 2, 2])), "non-decreasing"),
        (lambda: cpp.knn(x, x, 2, offsets([5]), cu), "must end at the number of rows"),
        (lambda: cpp.ngr_reconstruct(x, x, x, torch.full((6, 2), 6)), r"neighbors must be in \[-1, 6\)"),
        (lambda: cpp.ngr_reconstruct(x, x, x[:3], torch.zeros(6, 2).long()), "base_kept must have the shape"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([7])), r"keep_counts must be in \[0, item length\]"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([3, 3])), "one count per item"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([3], dtype=torch.int32)), "keep_counts must be int64"),
        (lambda: cpp.plan(x, x.double(), cu, cu, counts, 2), "x_before must have the dtype"),
        (lambda: cpp.plan(x, x, cu, cu, counts, 0), "num_neighbors must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
