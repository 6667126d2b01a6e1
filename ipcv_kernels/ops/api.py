"""The public IPCV ops.

All ops are inference-only and autograd-free: they run under ``torch.no_grad()``, register no
backward, and their outputs never carry a grad history. Every op validates its inputs here (shape,
dtype, device, offsets) and raises ``TypeError``/``ValueError`` naming the argument, then calls the
``torch.ops.ipcv_kernels.*`` custom op, which runs the backend chosen by ``backend``:

- ``"auto"``: the fastest backend available for the inputs' device (see ``available_backends``);
- ``"torch"``: the pure-PyTorch reference of ``ipcv_kernels.reference``;
- op-specific fast paths (``"sdpa"`` for attention; ``"triton"``, ``"cpp"`` where built).
"""

from __future__ import annotations

import torch

from .._validation import check_cu_seqlens, check_float, check_int, check_ratio, check_tensor
from ..reference import IPCVPlan, TokenSelection, shrink_cu_seqlens_reference, token_scores_reference
from . import library  # noqa: F401  (registers torch.ops.ipcv_kernels.*)
from .attention_backends import unfused_attention_inputs
from .dispatch import backend_names, resolve_backend

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_same_dtype(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if value.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {value.dtype}")


def _check_width(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if value.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"{name} must have trailing shape {tuple(like.shape[1:])} like {like_name}, got {tuple(value.shape)}"
        )


def _check_paired_offsets(
    name_a: str, cu_a: object, rows_a: int, name_b: str, cu_b: object, rows_b: int, device: torch.device
) -> None:
    if (cu_a is None) != (cu_b is None):
        raise ValueError(f"{name_a} and {name_b} must be given together (or both None)")
    if cu_a is None:
        return
    check_cu_seqlens(name_a, cu_a, total=rows_a, device=device)
    check_cu_seqlens(name_b, cu_b, total=rows_b, device=device)
    if cu_a.numel() != cu_b.numel():
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {cu_a.numel()} and {cu_b.numel()}")


@torch.no_grad()
def knn(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    cu_query: torch.Tensor | None = None,
    cu_ref: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Segment-aware k-nearest-neighbour search by Euclidean distance.

    Args:
        query: ``[Nq, D]`` fp16/bf16/fp32/fp64.
        ref: ``[Nr, D]``, same dtype and device as ``query``.
        k: neighbours per query row, ``>= 1``.
        cu_query, cu_ref: optional int32 ``[B + 1]`` offsets, given together and of equal length;
            query segment ``b`` searches only ref segment ``b``. ``None``: one segment.
        backend: ``"auto"`` or a registered backend name.

    Returns:
        int64 ``[Nq, k]``: global row indices into ``ref``, nearest first. Where the segment has
        fewer than ``k`` ref rows the missing slots are ``-1``. Distances are computed in fp32
        (fp64 for fp64 inputs); ties are broken arbitrarily.
    """
    check_float("query", query, ndim=2)
    check_float("ref", ref, ndim=2, device=query.device)
    _check_same_dtype("ref", ref, "query", query)
    _check_width("ref", ref, "query", query)
    check_int("k", k, low=1)
    _check_paired_offsets("cu_query", cu_query, query.shape[0], "cu_ref", cu_ref, ref.shape[0], query.device)
    return torch.ops.ipcv_kernels.knn(query, ref, k, cu_query, cu_ref, backend)


@torch.no_grad()
def ngr_reconstruct(
    base_drop: torch.Tensor,
    kept: torch.Tensor,
    base_kept: torch.Tensor,
    neighbors: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Neighbour-guided reconstruction of dropped tokens.

    ``recon[d] = base_drop[d] + mean over valid j of (kept - base_kept)[neighbors[d, j]]``

    Args:
        base_drop: ``[Nd, D]`` float, dropped tokens' states at the prune layer.
        kept: ``[Nk, D]`` float (same dtype), kept tokens' current states.
        base_kept: ``[Nk, D]`` float (same dtype), kept tokens' states at the prune layer.
        neighbors: int32/int64 ``[Nd, k]`` rows of ``kept``, each in ``[-1, Nk)``; ``-1`` = invalid.
        backend: ``"auto"`` or a registered backend name.

    Returns:
        ``[Nd, D]`` in ``base_drop``'s dtype; the mean is over valid neighbours only, accumulated in
        fp32 (fp64 for fp64), and a row without any valid neighbour equals ``base_drop``.
    """
    check_float("base_drop", base_drop, ndim=2)
    _check_reconstruction_inputs(base_drop, kept, base_kept, neighbors)
    return torch.ops.ipcv_kernels.ngr_reconstruct(base_drop, kept, base_kept, neighbors, backend)


def _check_reconstruction_inputs(base_drop: torch.Tensor, kept: object, base_kept: object, neighbors: object) -> None:
    """Check ``kept``, ``base_kept`` and ``neighbors`` against a checked ``base_drop`` (the NGR contract)."""
    check_float("kept", kept, ndim=2, device=base_drop.device)
    check_float("base_kept", base_kept, ndim=2, device=base_drop.device)
    for name, value in (("kept", kept), ("base_kept", base_kept)):
        _check_same_dtype(name, value, "base_drop", base_drop)
        _check_width(name, value, "base_drop", base_drop)
    if base_kept.shape != kept.shape:
        raise ValueError(f"base_kept must have the shape of kept {tuple(kept.shape)}, got {tuple(base_kept.shape)}")
    check_tensor("neighbors", neighbors, ndim=2, dtypes=INDEX_DTYPES, device=base_drop.device)
    if neighbors.shape[0] != base_drop.shape[0]:
        raise ValueError(
            f"neighbors must have {base_drop.shape[0]} rows (one per base_drop row), got {neighbors.shape[0]}"
        )
    if neighbors.numel() and (int(neighbors.min()) < -1 or int(neighbors.max()) >= kept.shape[0]):
        raise ValueError(f"neighbors must be in [-1, {kept.shape[0]}) (rows of kept, -1 = none)")


@torch.no_grad()
def ngr_restore(
    out: torch.Tensor,
    kept: torch.Tensor,
    base_drop: torch.Tensor,
    base_kept: torch.Tensor,
    keep: torch.Tensor,
    drop: torch.Tensor,
    neighbors: torch.Tensor,
    *,
    norm: torch.nn.LayerNorm | None = None,
    normed_out: torch.Tensor | None = None,
    backend: str = "auto",
    skip_check: bool = False,
) -> None:
    """The full sequence from kept rows and their NGR reconstructions, written in place (spec steps 4, 7).

    ``out[keep] = kept`` and ``out[drop] = ngr_reconstruct(base_drop, kept, base_kept, neighbors)``;
    with ``norm`` and ``normed_out``, also ``normed_out = norm(out)``: the restored sequence and the
    next block's ``norm1`` of it. The Triton backend writes the reconstructed rows straight into
    ``out`` (no temporary, no scatter) and normalises each row on the way out, in one pass.

    Args:
        out: ``[n, D]`` float with unit stride on the last dim, written in place.
        kept: ``[Nk, D]`` the kept tokens' current states; base_drop: ``[Nd, D]`` and base_kept:
            ``[Nk, D]`` the dropped / kept tokens' states at the prune layer; all in ``out``'s dtype.
        keep, drop: int32/int64 ``[Nk]`` / ``[Nd]`` rows of ``out``; together they hold every row
            once (``Nk + Nd = n``), as ``plan_ipcv``'s keep / drop do.
        neighbors: int32/int64 ``[Nd, k]`` rows of ``kept`` in ``[-1, Nk)`` (``-1`` = none).
        norm: an ``nn.LayerNorm`` over ``D`` (its weight and bias may be None); normed_out:
            ``[n, D]`` like ``out``. Both or neither.
        backend: ``"auto"`` or a registered backend name.
        skip_check: skip the input checks (as ``ngr_attention``'s): for callers that built the
            inputs from a plan themselves, since the row checks read indices back to the host.

    Returns:
        None: ``out`` (and ``normed_out``) hold the result.
    """
    if not skip_check:
        _check_restore_inputs(out, kept, base_drop, base_kept, keep, drop, neighbors, norm, normed_out)
    weight, bias, eps = (None, None, 0.0) if norm is None else (norm.weight, norm.bias, float(norm.eps))
    torch.ops.ipcv_kernels.ngr_restore(
        out, kept, base_drop, base_kept, keep, drop, neighbors, weight, bias, eps, normed_out, backend
    )


def _check_restore_inputs(
    out: object,
    kept: object,
    base_drop: object,
    base_kept: object,
    keep: object,
    drop: object,
    neighbors: object,
    norm: object,
    normed_out: object,
) -> None:
    check_float("out", out, ndim=2)
    device, (num_rows, dim) = out.device, out.shape
    if out.stride(-1) != 1:
        raise ValueError("out must have a unit stride on its last dim")
    check_float("base_drop", base_drop, ndim=2, device=device)
    _check_same_dtype("base_drop", base_drop, "out", out)
    _check_width("base_drop", base_drop, "out", out)
    _check_reconstruction_inputs(base_drop, kept, base_kept, neighbors)
    check_tensor("keep", keep, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_tensor("drop", drop, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if keep.shape[0] != kept.shape[0]:
        raise ValueError(f"keep must have {kept.shape[0]} entries (one per kept row), got {keep.shape[0]}")
    if drop.shape[0] != base_drop.shape[0]:
        raise ValueError(f"drop must have {base_drop.shape[0]} entries (one per base_drop row), got {drop.shape[0]}")
    rows = torch.cat([keep.long(), drop.long()])
    if rows.shape[0] != num_rows or (
        num_rows and (int(rows.min()) < 0 or int(rows.max()) >= num_rows or bool(rows.bincount().ne(1).any()))
    ):
        raise ValueError(f"keep and drop together must hold every row of out (0..{num_rows - 1}) exactly once")
    if (norm is None) != (normed_out is None):
        raise ValueError("norm and normed_out must be given together")
    if norm is not None:
        if not isinstance(norm, torch.nn.LayerNorm) or tuple(norm.normalized_shape) != (dim,):
            raise TypeError(f"norm must be an nn.LayerNorm over the last dim ({dim}), got {norm!r}")
        check_float("normed_out", normed_out, ndim=2, device=device)
        _check_same_dtype("normed_out", normed_out, "out", out)
        if normed_out.shape != out.shape or normed_out.stride(-1) != 1:
            raise ValueError(f"normed_out must be {tuple(out.shape)} with a unit stride on its last dim")
        for name, value in (("norm.weight", norm.weight), ("norm.bias", norm.bias)):
            if value is not None:
                check_float(name, value, ndim=1, device=device)


@torch.no_grad()
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

    The query rows of segment ``b`` (``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``) attend to all
    key/value rows of segment ``b``. In IPCV's attention-stabilisation blocks the queries are the
    kept tokens and the keys/values are kept + reconstructed tokens.

    Args:
        q: ``[Nq, H, Dh]`` fp16/bf16/fp32/fp64.
        k, v: ``[Nk, H, Dh]``, same dtype and device as ``q``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` offsets of equal length; segments may be empty.
        max_seqlen_q, max_seqlen_k: optional longest segment lengths (accepted for flash-attn
            compatibility; backends that need them compute them when absent).
        softmax_scale: defaults to ``Dh ** -0.5``.
        backend: ``"auto"``, ``"torch"`` (reference), ``"sdpa"``, or another registered backend.
        rotary: optional ``(cos, sin)``, float ``[Nk, Dh]`` each (``Dh`` even): apply the vision
            rotary ``x * cos + rotate_half(x) * sin`` to k (row ``j`` with row ``j``) and to q (at
            its rows ``q_rows`` / ``q_positions``, else row ``i`` with ``Nq == Nk``) before attending.
        q_rows: optional int64 ``[Nq']``: the queries are ``q[q_rows]`` of a full-length ``q``
            (``cu_seqlens_q`` then counts these ``Nq'`` rows); they are also the queries' rotary rows.
        q_positions: optional int64 ``[Nq]``: rotary rows of a compact ``q`` (needs ``rotary``;
            exclusive with ``q_rows``).
        skip_check: skip the input checks (for callers that built the inputs themselves, such as
            the model integrations once per block: the checks read offsets and indices back to
            the host, a synchronisation per check on CUDA). Wrong inputs are then not caught.

        Backends registered for ``"ngr_attention_fused"`` (Triton) handle both themselves: the
        gather inside the attention kernel, or together with the rotary in one pass over the kept
        queries (and one over the keys). The others get the rotated / gathered tensors computed
        with PyTorch first.

    Returns:
        ``[Nq, H, Dh]`` (``[Nq', H, Dh]`` with ``q_rows``) in ``q``'s dtype. Query rows whose
        segment has no keys get 0.
    """
    if not skip_check:
        _check_attention_inputs(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, rotary, q_rows, q_positions
        )
    scale = None if softmax_scale is None else float(softmax_scale)
    if rotary is None and q_rows is None and q_positions is None:
        return torch.ops.ipcv_kernels.ngr_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, backend)
    chosen = resolve_backend("ngr_attention", backend, q.device).name
    if chosen in backend_names("ngr_attention_fused"):
        cos, sin = rotary if rotary is not None else (None, None)
        return torch.ops.ipcv_kernels.ngr_attention_fused(
            q, k, v, cu_seqlens_q, cu_seqlens_k, cos, sin, q_rows, q_positions, scale, chosen
        )
    q, k = unfused_attention_inputs(q, k, rotary, q_rows, q_positions)
    return torch.ops.ipcv_kernels.ngr_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, chosen)


def _check_attention_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, rotary, q_rows, q_positions
) -> None:
    check_float("q", q, ndim=3)
    check_float("k", k, ndim=3, device=q.device)
    check_float("v", v, ndim=3, device=q.device)
    for name, value in (("k", k), ("v", v)):
        _check_same_dtype(name, value, "q", q)
        _check_width(name, value, "q", q)
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have as many rows as k ({k.shape[0]}), got {v.shape[0]}")
    num_queries = q.shape[0] if q_rows is None else _check_rows("q_rows", q_rows, q.shape[0], q.device)
    _check_paired_offsets("cu_seqlens_q", cu_seqlens_q, num_queries, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
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
        raise ValueError("rotary without q_rows / q_positions needs q and k rows aligned (Nq == Nk)")


@torch.no_grad()
def token_scores(x_before: torch.Tensor, x_after: torch.Tensor) -> torch.Tensor:
    """IPCV importance score ``||x_after[j] - x_before[j]||_2`` per token.

    Args:
        x_before: ``[n, D]`` float, the input of block ``P-1``.
        x_after: ``[n, D]`` float, its output (the input of block ``P``).

    Returns:
        ``[n]`` fp32 (fp64 for fp64 inputs).
    """
    check_float("x_before", x_before, ndim=2)
    check_float("x_after", x_after, ndim=2, device=x_before.device)
    if x_after.shape != x_before.shape:
        raise ValueError(f"x_after must have the shape of x_before {tuple(x_before.shape)}, got {tuple(x_after.shape)}")
    return token_scores_reference(x_before, x_after)


@torch.no_grad()
def select_tokens(
    scores: torch.Tensor, cu_items: torch.Tensor, ratio: float, *, backend: str = "auto"
) -> TokenSelection:
    """Per-item top-k token selection (spec step 2).

    Item ``b`` keeps its ``max(1, int(n_b * (1 - ratio)))`` highest-scoring tokens (an empty item
    keeps none).

    Args:
        scores: ``[n]`` float.
        cu_items: int32 ``[B + 1]`` item offsets (images / videos, or one item for global scope).
        ratio: fraction of tokens dropped, in ``[0, 1)``.

    Returns:
        ``TokenSelection(keep, drop, cu_keep, cu_drop)``: ascending int64 positions and int32
        per-item offsets into them. Ties in ``scores`` are broken arbitrarily.
    """
    check_float("scores", scores, ndim=1)
    check_cu_seqlens("cu_items", cu_items, total=scores.shape[0], device=scores.device)
    ratio = check_ratio("ratio", ratio)
    return TokenSelection(*torch.ops.ipcv_kernels.select_tokens(scores, cu_items, ratio, backend))


def shrink_cu_seqlens(cu_seqlens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Attention-segment offsets restricted to the kept tokens.

    Args:
        cu_seqlens: int32 ``[S + 1]`` offsets of the original segments.
        keep: int64 ``[Nk]`` ascending kept positions.

    Returns:
        int32 ``[S + 1]``; a segment left with no kept token becomes empty.
    """
    check_tensor("keep", keep, ndim=1, dtypes=(torch.int64,))
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=keep.device)
    return shrink_cu_seqlens_reference(cu_seqlens, keep)


@torch.no_grad()
def plan_ipcv(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
    *,
    backend: str = "auto",
    skip_check: bool = False,
) -> IPCVPlan:
    """The whole planning step: scores, per-item selection, neighbours, kept attention offsets.

    Args:
        x_before: ``[n, D]`` float, input of block ``P-1``.
        x_after: ``[n, D]`` float, output of block ``P-1`` (the spec's ``base``).
        cu_items: int32 ``[B + 1]`` item offsets: selection counts and neighbours are per item.
        cu_seqlens: int32 ``[S + 1]`` attention segments (e.g. one per video frame).
        ratio: fraction dropped, in ``[0, 1)``.
        num_neighbors: ``k >= 1``; each dropped token gets ``min(k, kept in its item)`` neighbours.

        skip_check: skip the input checks (as ``ngr_attention``'s).

    Returns:
        ``IPCVPlan(keep, drop, cu_keep, cu_drop, neighbors, cu_seqlens_kept)``.
    """
    if not skip_check:
        _check_plan_inputs(x_before, x_after, cu_items, cu_seqlens, ratio, num_neighbors)
    plan = torch.ops.ipcv_kernels.plan(x_before, x_after, cu_items, cu_seqlens, float(ratio), num_neighbors, backend)
    return IPCVPlan(*plan)


def _check_plan_inputs(
    x_before: object, x_after: object, cu_items: object, cu_seqlens: object, ratio: object, num_neighbors: object
) -> None:
    check_float("x_before", x_before, ndim=2)
    check_float("x_after", x_after, ndim=2, device=x_before.device)
    if x_after.shape != x_before.shape:
        raise ValueError(f"x_after must have the shape of x_before {tuple(x_before.shape)}, got {tuple(x_after.shape)}")
    check_cu_seqlens("cu_items", cu_items, total=x_after.shape[0], device=x_after.device)
    check_cu_seqlens("cu_seqlens", cu_seqlens, total=x_after.shape[0], device=x_after.device)
    check_ratio("ratio", ratio)
    check_int("num_neighbors", num_neighbors, low=1)


def backend_for(op: str, backend: str, device: torch.device) -> str:
    """The backend name ``backend`` resolves to for ``op`` on ``device`` (``auto`` made concrete)."""
    return resolve_backend(op, backend, device).name
