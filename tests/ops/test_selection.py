"""Token selection: ``select_tokens`` on every backend (``conftest.BACKENDS``) against the reference
(a hand case, dtypes, ratios, empty and one-token items); ``token_scores``, ``keep_count`` and
``shrink_cu_seqlens`` (one PyTorch expression each, no backends).

Scores are distinct (built well separated, or random floats), so keep/drop sets compare exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import offsets, on_cuda

import ipcv_kernels as ik
from ipcv_kernels.reference import keep_count, select_tokens_reference

OP = "select_tokens"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ITEM_LENGTHS = [9, 0, 1, 30, 2]


def check_selection(got, expected):
    for name, value, reference in zip(expected._fields, got, expected, strict=True):
        assert torch.equal(value.cpu(), reference.cpu()), name


def test_hand_case(backend):
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7], device=backend.device)
    sel = ik.select_tokens(scores, offsets([4, 0, 3], backend.device), 0.5, backend=backend.name)
    # Item 0 keeps int(4 * 0.5) = 2 of (0.1, 0.9, 0.5, 0.3): positions 1, 2. Item 2 keeps
    # max(1, int(1.5)) = 1 of (0.8, 0.2, 0.7): position 4. The empty item keeps nothing.
    assert sel.keep.tolist() == [1, 2, 4]
    assert sel.drop.tolist() == [0, 3, 5, 6]
    assert sel.cu_keep.tolist() == [0, 2, 2, 3]
    assert sel.cu_drop.tolist() == [0, 2, 2, 4]


def test_random_scores_at_every_ratio(backend):
    cu_items = offsets(ITEM_LENGTHS, backend.device)
    scores = torch.rand(sum(ITEM_LENGTHS), generator=torch.Generator().manual_seed(0)).to(backend.device)
    for ratio in (0.0, 0.5, 0.65, 0.99):
        got = ik.select_tokens(scores, cu_items, ratio, backend=backend.name)
        check_selection(got, select_tokens_reference(scores, cu_items, ratio))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_across_dtypes(backend, dtype):
    generator = torch.Generator().manual_seed(3)
    items = [37, 0, 1, 5, 300]
    scores = (1.0 + 0.01 * torch.randperm(sum(items), generator=generator).double()).to(dtype)
    cu_items = offsets(items)
    for ratio in (0.0, 0.5, 0.65, 0.99):
        expected = select_tokens_reference(scores, cu_items, ratio)
        got = ik.select_tokens(scores.to(backend.device), cu_items.to(backend.device), ratio, backend=backend.name)
        check_selection(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(backend, dtype):
    device = on_cuda(backend)
    generator = torch.Generator().manual_seed(6)
    scores = (1.0 + 0.01 * torch.randperm(400, generator=generator).double()).to(dtype)
    cu_items = offsets([100, 0, 300])
    got = ik.select_tokens(scores.to(device), cu_items.to(device), 0.65, backend=backend.name)
    check_selection(got, select_tokens_reference(scores, cu_items, 0.65))


def test_token_scores_hand_case():
    before = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    after = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert ik.token_scores(before, after).tolist() == [5.0, 0.0]


@pytest.mark.parametrize(("n", "ratio"), [(10, 0.65), (7, 0.5), (1, 0.9), (3, 0.0), (100, 0.999)])
def test_keep_count_is_the_spec_formula(n, ratio):
    assert keep_count(n, ratio) == max(1, int(n * (1 - ratio)))


def test_shrink_cu_seqlens():
    keep = torch.tensor([1, 2, 7, 8])
    assert ik.shrink_cu_seqlens(offsets([4, 3, 2]), keep).tolist() == [0, 2, 2, 4]
