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
    keep, drop, neighbors = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([[0, 1], [2, -1], [-1, -1]])

    def restore(**changes):
        args = dict(
            out=torch.empty(6, 4),
            kept=x[:3],
            base_drop=x[3:],
            base_kept=x[:3],
            keep=keep,
            drop=drop,
            neighbors=neighbors,
            norm_weight=torch.ones(4),
            norm_bias=None,
            norm_eps=1e-6,
            normed_out=torch.empty(6, 4),
        )
        args.update(changes)
        cpp.ngr_restore(*args.values())

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
        (lambda: restore(out=x.T.contiguous().T), "out must be contiguous"),
        (lambda: restore(keep=keep.int()), "keep must be int64"),
        (lambda: restore(drop=drop + 6), r"drop must be in \[0, 6\), but entry 0 is 7"),
        (lambda: restore(keep=keep[:2]), "keep must be 1-D with 3 entries"),
        (lambda: restore(drop=keep), "row 0 appears twice"),
        (lambda: restore(neighbors=neighbors + 3), r"neighbors must be in \[-1, 3\)"),
        (lambda: restore(normed_out=None), "norm_weight / norm_bias need normed_out"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([7])), r"keep_counts must be in \[0, item length\]"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([3, 3])), "one count per item"),
        (lambda: cpp.select_tokens(x[:, 0], cu, torch.tensor([3], dtype=torch.int32)), "keep_counts must be int64"),
        (lambda: cpp.plan(x, x.double(), cu, cu, counts, 2), "x_before must have the dtype"),
        (lambda: cpp.plan(x, x, cu, cu, counts, 0), "num_neighbors must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
