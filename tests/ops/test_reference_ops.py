"""Every op against hand-computed small cases, through the public API with the reference backend
and with ``auto`` (which must agree). Edge cases: empty and one-token segments, k larger than a
segment, head dim 80."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import offsets

import ipcv_kernels as ik
from ipcv_kernels.reference import keep_count
from ipcv_kernels.testing import assert_close

BACKENDS = ["torch", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_hand_case_on_a_line(backend):
    # Points on a line: nearest neighbours are obvious and tie-free.
    ref = torch.tensor([[0.0], [10.0], [3.0], [7.0]])
    query = torch.tensor([[2.9], [9.0], [6.0]])
    got = ik.knn(query, ref, 2, backend=backend)
    assert got.tolist() == [[2, 0], [1, 3], [3, 2]]
    assert got.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_segments_never_cross_and_pad_with_minus_one(backend):
    ref = torch.tensor([[0.0], [1.0], [100.0], [101.0], [102.0]])
    query = torch.tensor([[100.4], [0.2], [101.6], [5.0]])
    cu_query, cu_ref = offsets([1, 3, 0]), offsets([2, 0, 3])
    # Segment 0 (query 100.4) may only see refs 0,1; segment 1 has no refs; segment 2 no queries.
    got = ik.knn(query, ref, 3, cu_query, cu_ref, backend=backend)
    assert got.tolist() == [[1, 0, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_one_token_segments(backend):
    ref = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    query = torch.tensor([[0.0, 0.0], [9.0, 9.0]])
    got = ik.knn(query, ref, 4, offsets([1, 1]), offsets([1, 1]), backend=backend)
    assert got.tolist() == [[0, -1, -1, -1], [1, -1, -1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_empty_query(backend):
    got = ik.knn(torch.empty(0, 3), torch.randn(4, 3), 2, backend=backend)
    assert got.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ngr_reconstruct_hand_case(backend):
    base_drop = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    base_kept = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    kept = torch.tensor([[1.0, 2.0], [13.0, 10.0]])  # deltas (1, 2) and (3, 0)
    neighbors = torch.tensor([[0, 1], [1, -1], [-1, -1]])
    got = ik.ngr_reconstruct(base_drop, kept, base_kept, neighbors, backend=backend)
    expected = torch.tensor([[1.0 + 2.0, 1.0 + 1.0], [2.0 + 3.0, 2.0], [3.0, 3.0]])
    assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ngr_reconstruct_no_dropped_rows(backend):
    got = ik.ngr_reconstruct(
        torch.empty(0, 4), torch.randn(3, 4), torch.randn(3, 4), torch.empty(0, 2, dtype=torch.long)
    )
    assert got.shape == (0, 4)


def _attention_by_hand(q, k, v, scale):
    """Two-loop softmax attention for one query row and one head, in Python floats."""
    logits = [scale * sum(a * b for a, b in zip(q, key, strict=True)) for key in k]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [sum(w * val[d] for w, val in zip(weights, v, strict=True)) / total for d in range(len(v[0]))]


@pytest.mark.parametrize("backend", ["torch", "sdpa", "auto"])
def test_ngr_attention_hand_case_with_empty_and_keyless_segments(backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2), torch.randn(5, 1, 2), torch.randn(5, 1, 2)
    # Segment 0: 2 queries over 3 keys; segment 1: no queries, 1 key; segment 2: 1 query, 1 key;
    # segment 3: 0 queries, 0 keys.
    cu_q, cu_k = offsets([2, 0, 1, 0]), offsets([3, 1, 1, 0])
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, backend=backend)
    scale = 2**-0.5
    rows = [(0, slice(0, 3)), (1, slice(0, 3)), (2, slice(4, 5))]
    for i, keys in rows:
        expected = _attention_by_hand(q[i, 0].tolist(), k[keys, 0].tolist(), v[keys, 0].tolist(), scale)
        assert_close(got[i, 0], torch.tensor(expected))


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_ngr_attention_query_without_keys_is_zero(backend):
    q, k = torch.randn(2, 2, 8), torch.randn(3, 2, 8)
    got = ik.ngr_attention(q, k, k, offsets([1, 1]), offsets([3, 0]), backend=backend)
    assert torch.all(got[1] == 0)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("head_dim", [80, 64])
def test_ngr_attention_head_dim_and_scale(backend, head_dim):
    torch.manual_seed(1)
    q, k, v = (torch.randn(n, 3, head_dim, dtype=torch.float64) for n in (5, 11, 11))
    cu_q, cu_k = offsets([2, 3]), offsets([4, 7])
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, softmax_scale=0.1, backend=backend)
    for (q0, q1), (k0, k1) in (((0, 2), (0, 4)), ((2, 5), (4, 11))):
        probs = torch.softmax(0.1 * torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1]), -1)
        assert_close(got[q0:q1], torch.einsum("hqk,khd->qhd", probs, v[k0:k1]))


def test_ngr_attention_keeps_query_dtype():
    q = torch.randn(4, 2, 16, dtype=torch.float16)
    assert ik.ngr_attention(q, q, q, offsets([4]), offsets([4])).dtype == torch.float16


def test_token_scores_hand_case():
    before = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    after = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert ik.token_scores(before, after).tolist() == [5.0, 0.0]


@pytest.mark.parametrize(("n", "ratio"), [(10, 0.65), (7, 0.5), (1, 0.9), (3, 0.0), (100, 0.999)])
def test_keep_count_is_the_spec_formula(n, ratio):
    assert keep_count(n, ratio) == max(1, int(n * (1 - ratio)))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_select_tokens_hand_case(backend):
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    sel = ik.select_tokens(scores, offsets([4, 0, 3]), 0.5, backend=backend)
    # Item 0 keeps int(4 * 0.5) = 2 of (0.1, 0.9, 0.5, 0.3): positions 1, 2. Item 2 keeps
    # max(1, int(1.5)) = 1 of (0.8, 0.2, 0.7): position 4. The empty item keeps nothing.
    assert sel.keep.tolist() == [1, 2, 4]
    assert sel.drop.tolist() == [0, 3, 5, 6]
    assert sel.cu_keep.tolist() == [0, 2, 2, 3]
    assert sel.cu_drop.tolist() == [0, 2, 2, 4]


def test_shrink_cu_seqlens():
    keep = torch.tensor([1, 2, 7, 8])
    assert ik.shrink_cu_seqlens(offsets([4, 3, 2]), keep).tolist() == [0, 2, 2, 4]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_plan_is_selection_then_neighbours_within_items(backend):
    torch.manual_seed(0)
    before, after = torch.randn(12, 4), torch.randn(12, 4)
    cu_items, cu_seqlens = offsets([5, 7]), offsets([5, 3, 4])
    plan = ik.plan_ipcv(before, after, cu_items, cu_seqlens, 0.5, 10, backend=backend)
    sel = ik.select_tokens(ik.token_scores(before, after), cu_items, 0.5, backend="torch")
    assert torch.equal(plan.keep, sel.keep) and torch.equal(plan.drop, sel.drop)
    # Item 0 keeps 2, so its dropped tokens get exactly 2 valid neighbours, both inside item 0.
    assert plan.cu_keep.tolist() == [0, 2, 5]
    item0 = plan.neighbors[: int(plan.cu_drop[1])]
    assert (item0[:, :2] >= 0).all() and (item0[:, :2] < 2).all() and (item0[:, 2:] == -1).all()
    item1 = plan.neighbors[int(plan.cu_drop[1]) :]
    assert (item1[:, :3] >= 2).all() and (item1[:, 3:] == -1).all()
    assert plan.cu_seqlens_kept.tolist() == ik.shrink_cu_seqlens(cu_seqlens, plan.keep).tolist()
