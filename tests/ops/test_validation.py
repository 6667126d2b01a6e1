"""Bad input raises TypeError/ValueError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

import ipcv_kernels as ik
from ipcv_kernels.testing.models import build_qwen2_vl_tower

Q, R = torch.randn(6, 4), torch.randn(5, 4)


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: ik.knn(Q.numpy(), R, 2), TypeError, "query"),
        (lambda: ik.knn(Q[:, None], R, 2), ValueError, "query"),
        (lambda: ik.knn(Q.long(), R, 2), TypeError, "query"),
        (lambda: ik.knn(Q, R.double(), 2), TypeError, "ref"),
        (lambda: ik.knn(Q, R[:, :3], 2), ValueError, "ref"),
        (lambda: ik.knn(Q, R, 0), ValueError, "k"),
        (lambda: ik.knn(Q, R, 2.0), TypeError, "k"),
        (lambda: ik.knn(Q, R, 2, offsets([6]), None), ValueError, "cu_query"),
        (lambda: ik.knn(Q, R, 2, offsets([6]).long(), offsets([5])), TypeError, "cu_query"),
        (lambda: ik.knn(Q, R, 2, offsets([3, 3]), offsets([5])), ValueError, "cu_query"),
        (
            lambda: ik.knn(Q, R, 2, torch.tensor([0, 4, 2, 6], dtype=torch.int32), offsets([1, 1, 3])),
            ValueError,
            "cu_query",
        ),
        (lambda: ik.knn(Q, R, 2, offsets([6]), offsets([4])), ValueError, "cu_ref"),
        (lambda: ik.knn(Q, R, 2, backend="nope"), ValueError, "backend"),
    ],
)
def test_knn_rejects(call, error, name):
    with pytest.raises(error, match=name):
        call()


BD, K, BK, NB = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 4), torch.zeros(3, 2, dtype=torch.long)


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: ik.ngr_reconstruct(BD, K.half(), BK, NB), TypeError, "kept"),
        (lambda: ik.ngr_reconstruct(BD, K, BK[:4], NB), ValueError, "base_kept"),
        (lambda: ik.ngr_reconstruct(BD, K, BK, NB.float()), TypeError, "neighbors"),
        (lambda: ik.ngr_reconstruct(BD, K, BK, NB[:2]), ValueError, "neighbors"),
        (lambda: ik.ngr_reconstruct(BD, K, BK, NB + 5), ValueError, "neighbors"),
        (lambda: ik.ngr_reconstruct(BD, K, BK, NB - 2), ValueError, "neighbors"),
        (lambda: ik.ngr_reconstruct(BD, K, BK, NB[:, 0]), ValueError, "neighbors"),
    ],
)
def test_ngr_reconstruct_rejects(call, error, name):
    with pytest.raises(error, match=name):
        call()


QA, KA = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
CQ, CK = offsets([1, 3]), offsets([2, 4])


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: ik.ngr_attention(QA[0], KA, KA, CQ, CK), ValueError, "q"),
        (lambda: ik.ngr_attention(QA, KA.half(), KA, CQ, CK), TypeError, "k"),
        (lambda: ik.ngr_attention(QA, KA, KA[:5], CQ, CK), ValueError, "v"),
        (lambda: ik.ngr_attention(QA, KA[:, :, :4], KA, CQ, CK), ValueError, "k"),
        (lambda: ik.ngr_attention(QA, KA, KA, CQ.long(), CK), TypeError, "cu_seqlens_q"),
        (lambda: ik.ngr_attention(QA, KA, KA, CQ, offsets([2, 2, 2])), ValueError, "cu_seqlens"),
        (
            lambda: ik.ngr_attention(QA, KA, KA, CQ, torch.tensor([0, 7, 6], dtype=torch.int32)),
            ValueError,
            "cu_seqlens_k",
        ),
        (
            lambda: ik.ngr_attention(QA, KA, KA, torch.tensor([1, 4], dtype=torch.int32), offsets([6])),
            ValueError,
            "cu_seqlens_q",
        ),
        (lambda: ik.ngr_attention(QA, KA, KA, CQ, CK, softmax_scale=-1.0), ValueError, "softmax_scale"),
        (lambda: ik.ngr_attention(QA, KA, KA, CQ, CK, max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    ],
)
def test_ngr_attention_rejects(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: ik.select_tokens(torch.rand(5), offsets([5]), 1.0), ValueError, "ratio"),
        (lambda: ik.select_tokens(torch.rand(5), offsets([5]), -0.1), ValueError, "ratio"),
        (lambda: ik.select_tokens(torch.rand(5), offsets([5]), "0.5"), TypeError, "ratio"),
        (lambda: ik.select_tokens(torch.rand(5, 1), offsets([5]), 0.5), ValueError, "scores"),
        (lambda: ik.select_tokens(torch.rand(5), offsets([4]), 0.5), ValueError, "cu_items"),
        (lambda: ik.token_scores(torch.rand(5, 2), torch.rand(4, 2)), ValueError, "x_after"),
        (
            lambda: ik.plan_ipcv(torch.rand(5, 2), torch.rand(5, 2), offsets([5]), offsets([5]), 0.5, 0),
            ValueError,
            "num_neighbors",
        ),
        (
            lambda: ik.plan_ipcv(torch.rand(5, 2), torch.rand(5, 2), offsets([5]), offsets([4]), 0.5, 2),
            ValueError,
            "cu_seqlens",
        ),
    ],
)
def test_selection_and_plan_reject(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"ratio": 1.0}, ValueError, "ratio"),
        ({"ratio": -0.5}, ValueError, "ratio"),
        ({"prune_layer": 0}, ValueError, "prune_layer"),
        ({"as_layers": -1}, ValueError, "as_layers"),
        ({"num_neighbors": 0}, ValueError, "num_neighbors"),
        ({"scope": "batch"}, ValueError, "scope"),
        ({"as_queries": "some"}, ValueError, "as_queries"),
        ({"prune_layer": 2.0}, TypeError, "prune_layer"),
        ({"ops_backend": 1}, TypeError, "ops_backend"),
        ({"attention_backend": None}, TypeError, "attention_backend"),
    ],
)
def test_config_rejects(kwargs, error, name):
    with pytest.raises(error, match=name):
        ik.IPCVConfig(**kwargs)


def test_apply_rejects_prune_layer_past_depth_and_leaves_model_untouched():
    tower = build_qwen2_vl_tower()  # depth 6
    with pytest.raises(ValueError, match="prune_layer"):
        ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=6))
    assert ik.get_ipcv_patch(tower) is None
    assert all("forward" not in block.__dict__ for block in tower.blocks)


def test_apply_rejects_unsupported_model_and_bad_config():
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration"):
        ik.apply_ipcv(torch.nn.Linear(2, 2), ik.IPCVConfig())
    with pytest.raises(TypeError, match="config"):
        ik.apply_ipcv(build_qwen2_vl_tower(), {"ratio": 0.5})


def test_backend_for_wrong_device_or_unknown_is_clear():
    with pytest.raises(ValueError, match="backend"):
        ik.ngr_attention(QA, KA, KA, CQ, CK, backend="flash")


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: ik.knn(Q, R.to("meta"), 2), "ref"),
        (lambda: ik.ngr_reconstruct(BD, K, BK.to("meta"), NB), "base_kept"),
        (lambda: ik.ngr_attention(QA, KA, KA.to("meta"), CQ, CK), "v"),
        (lambda: ik.ngr_attention(QA, KA, KA, CQ, CK.to("meta")), "cu_seqlens_k"),
    ],
)
def test_mixed_devices_are_rejected(call, name):
    # The meta device stands in for "another device" on a CPU-only machine.
    with pytest.raises(ValueError, match=f"{name} must be on"):
        call()


def test_skip_check_changes_nothing_on_valid_inputs():
    # Every public op takes skip_check (the fast entry of the model integrations).
    scores, cu = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7]), offsets([2, 3])
    x_before, x_after = torch.randn(5, 4), torch.randn(5, 4)
    keep, drop = torch.tensor([0, 2, 3]), torch.tensor([1, 4])

    def restored(skip_check):
        out = torch.empty(5, 4)
        ik.ngr_restore(out, K[:3], BD[:2], BK[:3], keep, drop, NB[:2], skip_check=skip_check)
        return out

    calls = [
        lambda skip_check: ik.knn(Q, R, 2, skip_check=skip_check),
        lambda skip_check: ik.ngr_reconstruct(BD, K, BK, NB, skip_check=skip_check),
        restored,
        lambda skip_check: ik.ngr_attention(QA, KA, KA, CQ, CK, skip_check=skip_check),
        lambda skip_check: ik.token_scores(x_before, x_after, skip_check=skip_check),
        lambda skip_check: ik.select_tokens(scores, cu, 0.5, skip_check=skip_check),
        lambda skip_check: ik.shrink_cu_seqlens(cu, keep, skip_check=skip_check),
        lambda skip_check: ik.plan_ipcv(x_before, x_after, cu, cu, 0.5, 1, skip_check=skip_check),
    ]
    for call in calls:
        checked, unchecked = call(False), call(True)
        if isinstance(checked, torch.Tensor):
            checked, unchecked = (checked,), (unchecked,)
        for a, b in zip(checked, unchecked, strict=True):
            assert torch.equal(a, b)
