"""Backends built from PyTorch alone: the references (``"torch"``) and per-segment SDPA (``"sdpa"``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import (
    knn_reference,
    ngr_attention_reference,
    ngr_reconstruct_reference,
    ngr_restore_reference,
    plan_reference,
    select_tokens_reference,
)
from .dispatch import Backend, register_backend

ALL_DEVICES = ("cpu", "cuda")


def ngr_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` call per segment.

    PyTorch picks a fused (flash / memory-efficient) kernel per segment, so memory stays linear
    in tokens on both CPU and CUDA; the Python loop over segments is the cost.
    """
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        seg = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None],
            k[k0:k1].transpose(0, 1)[None],
            v[k0:k1].transpose(0, 1)[None],
            scale=softmax_scale,
        )
        out[q0:q1] = seg[0].transpose(0, 1)
    return out


# The references are the last resort of ``auto`` (priority 0); sdpa beats the reference for attention.
for _op, _fn in (
    ("knn", knn_reference),
    ("ngr_reconstruct", ngr_reconstruct_reference),
    ("ngr_restore", ngr_restore_reference),
    ("ngr_attention", ngr_attention_reference),
    ("select_tokens", select_tokens_reference),
    ("plan", plan_reference),
):
    register_backend(_op, Backend("torch", _fn, ALL_DEVICES, priority=0))
register_backend("ngr_attention", Backend("sdpa", ngr_attention_sdpa, ALL_DEVICES, priority=10))
