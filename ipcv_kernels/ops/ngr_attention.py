"""``ngr_attention``: non-causal varlen attention of kept queries over kept + reconstructed keys.

The public function, its input checks, the custom op ``ipcv_kernels::ngr_attention`` and its
reference backend ``"torch"``. The op's optional steps, the vision rotary on q and k (``"rotary"``)
and the gather of the query rows (``"q_gather"``), are arguments of the one custom op: a backend
that declares them in ``Backend.fuses`` gets them as keyword arguments; for any other backend the
custom op computes them with PyTorch first (``unfused_attention_inputs``) and calls it on the
rotated / gathered tensors.
"""

from __future__ import annotations

import torch

from .._validation import (
    INDEX_DTYPES,
    check_float,
    check_int,
    check_paired_offsets,
    check_same_dtype,
    check_tensor,
    check_width,
)
from ..reference import ngr_attention_reference, unfused_attention_inputs
from ._custom_op import autograd_free, ipcv_op
from .dispatch import ALL_DEVICES, Backend, register_backend, resolve_backend

# The names of the optional steps in ``Backend.fuses``.
ROTARY = "rotary"
Q_GATHER = "q_gather"
# The widest head the fused attention kernels take (Triton's, flash-attn's, PyTorch's varlen):
# their backends run wider heads through ``sdpa`` / the reference instead.
MAX_HEAD_DIM = 256


@autograd_free
def ngr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    *,
    backend: str = "auto",
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    q_rows: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    skip_check: bool = False,
) -> torch.Tensor:
    """Non-causal varlen attention with separate query and key/value segments.

    The query rows of segment ``b`` (``cu_seqlens_q[b]:cu_seqlens_q[b+1]``) attend to all
    key/value rows of segment ``b``. In IPCV's attention-stabilisation blocks the queries are the
    kept tokens (``Nq = Nk``) and the keys/values all tokens, kept + reconstructed (``Nkv = n``).

    Args:
        q: ``[Nq, H, Dh]`` fp16/bf16/fp32/fp64; with ``q_rows``, the full-length ``[n, H, Dh]``
            the ``Nq`` queries are gathered from.
        k, v: ``[Nkv, H, Dh]``, same dtype and device as ``q``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` offsets of equal length into the ``Nq``
            queries and the ``Nkv`` keys; segments may be empty.
        max_seqlen_q, max_seqlen_k: optional longest segment lengths (accepted for flash-attn
            compatibility; backends that need them compute them when absent).
        softmax_scale: defaults to ``Dh ** -0.5``.
        backend: ``"auto"``, ``"torch"`` (reference), ``"sdpa"``, or another registered backend.
        rotary: optional ``(cos, sin)``, float ``[Nkv, Dh]`` each (``Dh`` even): apply the vision
            rotary ``x * cos + rotate_half(x) * sin`` to k (row ``j`` with row ``j``) and to q (at
            its rows ``q_rows`` / ``q_positions``, else row ``i`` with ``Nq == Nkv``) before attending.
        q_rows: optional int64 ``[Nq]``: the queries are ``q[q_rows]`` of a full-length ``q``
            (``cu_seqlens_q`` counts these ``Nq`` rows); they are also the queries' rotary rows.
        q_positions: optional int64 ``[Nq]``: rotary rows of a compact ``q`` (needs ``rotary``;
            exclusive with ``q_rows``).
        skip_check: skip the input checks (for callers that built the inputs themselves, such as
            the model integrations once per block: the checks read offsets and indices back to
            the host, a synchronisation per check on CUDA). Wrong inputs are then not caught.

        Backends that declare ``"rotary"`` / ``"q_gather"`` in ``Backend.fuses`` (Triton) do both
        themselves: the gather inside the attention kernel, or together with the rotary in one pass
        over the kept queries (and one over the keys). The others get the rotated / gathered
        tensors computed with PyTorch first.

    Returns:
        ``[Nq, H, Dh]`` in ``q``'s dtype. Query rows whose segment has no keys get 0.
    """
    if not skip_check:
        _check_attention_inputs(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, rotary, q_rows, q_positions
        )
    scale = None if softmax_scale is None else float(softmax_scale)
    cos, sin = rotary if rotary is not None else (None, None)
    return ngr_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, cos, sin, q_rows, q_positions, backend)


def _check_attention_inputs(
    q: object,
    k: object,
    v: object,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    max_seqlen_q: object,
    max_seqlen_k: object,
    softmax_scale: object,
    rotary: object,
    q_rows: object,
    q_positions: object,
) -> None:
    check_float("q", q, ndim=3)
    check_float("k", k, ndim=3, device=q.device)
    check_float("v", v, ndim=3, device=q.device)
    for name, value in (("k", k), ("v", v)):
        check_same_dtype(name, value, "q", q)
        check_width(name, value, "q", q)
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have as many rows as k ({k.shape[0]}), got {v.shape[0]}")
    num_queries = q.shape[0] if q_rows is None else _check_rows("q_rows", q_rows, q.shape[0], q.device)
    check_paired_offsets("cu_seqlens_q", cu_seqlens_q, num_queries, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k are required")
    _check_fused_attention_options(q, k, rotary, q_rows, q_positions)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value is not None:
            check_int(name, value, low=0)
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float, got {softmax_scale!r}")


def _check_rows(name: str, rows: object, limit: int, device: torch.device) -> int:
    """Check int ``[m]`` row indices in ``[0, limit)``; returns ``m``."""
    check_tensor(name, rows, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= limit):
        raise ValueError(f"{name} must hold row indices in [0, {limit})")
    return rows.shape[0]


def _check_fused_attention_options(
    q: torch.Tensor,
    k: torch.Tensor,
    rotary: object,
    q_rows: torch.Tensor | None,
    q_positions: object,
) -> None:
    if q_rows is not None and q_positions is not None:
        raise ValueError("q_rows and q_positions are mutually exclusive (q_rows are already the rotary rows)")
    if rotary is None:
        if q_positions is not None:
            raise ValueError("q_positions needs rotary (they are the queries' rows of cos/sin)")
        return
    if not (isinstance(rotary, tuple) and len(rotary) == 2):
        raise TypeError("rotary must be a (cos, sin) tuple of tensors")
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dim, got {head_dim}")
    for name, table in zip(("rotary cos", "rotary sin"), rotary, strict=True):
        check_float(name, table, ndim=2, device=q.device)
        if tuple(table.shape) != (k.shape[0], head_dim):
            raise ValueError(
                f"{name} must have shape {(k.shape[0], head_dim)} (one row per key), got {tuple(table.shape)}"
            )
    if q_rows is not None:
        _check_rows("q_rows", q_rows, k.shape[0], q.device)
    elif q_positions is not None:
        if _check_rows("q_positions", q_positions, k.shape[0], q.device) != q.shape[0]:
            raise ValueError(f"q_positions must have {q.shape[0]} entries (one per q row), got {q_positions.shape[0]}")
    elif q.shape[0] != k.shape[0]:
        raise ValueError("rotary without q_rows / q_positions needs q and k rows aligned (Nq == Nkv)")


def _ngr_attention_fake(q: torch.Tensor, *args: object) -> torch.Tensor:
    # The op's arguments (the schema below); only q and q_rows (the 9th) decide the output's shape.
    q_rows = args[7]
    num_queries = q.shape[0] if q_rows is None else q_rows.shape[0]
    return q.new_empty((num_queries, *q.shape[1:]))


@ipcv_op("ngr_attention", fake=_ngr_attention_fake)
def ngr_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_rows: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    chosen = resolve_backend("ngr_attention", backend, q.device)
    rotary = None if cos is None else (cos, sin)
    steps = ({ROTARY} if rotary is not None else set()) | ({Q_GATHER} if q_rows is not None else set())
    if steps and steps <= chosen.fuses:
        return chosen.fn(
            q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, rotary=rotary, q_rows=q_rows, q_positions=q_positions
        )
    if steps:
        # All steps in PyTorch: the query rows a backend would gather are also their rotary rows.
        q, k = unfused_attention_inputs(q, k, rotary, q_rows, q_positions)
    return chosen.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)


register_backend("ngr_attention", Backend("torch", ngr_attention_reference, ALL_DEVICES))
