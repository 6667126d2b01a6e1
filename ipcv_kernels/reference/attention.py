"""Pure-PyTorch reference for non-causal varlen attention with separate query/key segments, and the
PyTorch form of its optional steps (rotary, query gather)."""

from __future__ import annotations

import torch

from .knn import accumulation_dtype
from .rotary import apply_rotary_vision


def ngr_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``out[i] = softmax(scale * q[i] . K_b^T) V_b`` for query row ``i`` of segment ``b``.

    Args:
        q: ``[Nq, H, Dh]`` float; k, v: ``[Nkv, H, Dh]`` float (same dtype).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` offsets of the query and key segments.
        softmax_scale: defaults to ``Dh ** -0.5``.

    Returns:
        ``[Nq, H, Dh]`` in ``q``'s dtype. Rows of a segment with no keys are 0. Materialises the
        ``[H, Lq, Lk]`` score matrix of one segment at a time: a readable oracle, not a fast path.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qs = q[q0:q1].to(acc).transpose(0, 1)  # [H, Lq, Dh]
        ks = k[k0:k1].to(acc).transpose(0, 1)
        vs = v[k0:k1].to(acc).transpose(0, 1)
        probs = torch.softmax(scale * qs @ ks.transpose(1, 2), dim=-1)
        out[q0:q1] = (probs @ vs).transpose(0, 1)
    return out.to(q.dtype)


def unfused_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    q_rows: torch.Tensor | None,
    q_positions: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ngr_attention``'s optional steps done by PyTorch: ``q`` gathered at ``q_rows``, then ``q``
    and ``k`` rotated; what a backend that does not fuse them attends with.

    Args:
        q: ``[Nq, H, Dh]`` float, or with ``q_rows`` the full-length ``[n, H, Dh]``.
        k: ``[Nkv, H, Dh]`` float.
        rotary: optional ``(cos, sin)``, float ``[Nkv, Dh]`` each; row ``j`` rotates key row ``j``.
        q_rows: optional int ``[Nq]`` query rows to gather (also their rotary rows).
        q_positions: optional int ``[Nq]`` rotary rows of a compact ``q``.

    Returns:
        ``(q, k)``: ``[Nq, H, Dh]`` and ``[Nkv, H, Dh]`` in their input dtypes.
    """
    positions = q_rows if q_rows is not None else q_positions
    if q_rows is not None:
        q = q.index_select(0, q_rows)
    if rotary is not None:
        cos, sin = rotary
        q_cos, q_sin = (
            (cos, sin) if positions is None else (cos.index_select(0, positions), sin.index_select(0, positions))
        )
        q = apply_rotary_vision(q, q_cos, q_sin)
        k = apply_rotary_vision(k, cos, sin)
    return q, k
