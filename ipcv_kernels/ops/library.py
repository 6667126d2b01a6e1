"""``torch.library`` registration of the IPCV ops (namespace ``ipcv_kernels``).

Each op is a custom op whose real implementation resolves ``backend`` in the registry, plus a fake
(meta) implementation that only describes output shapes, so the ops trace under
``torch.compile`` without running. No autograd formula is registered: the ops are inference-only.
These entry points do no validation; the public wrappers in ``ipcv_kernels.ops.api`` do.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend


@torch.library.custom_op("ipcv_kernels::knn", mutates_args=())
def knn_op(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    cu_query: torch.Tensor | None,
    cu_ref: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return resolve_backend("knn", backend, query.device).fn(query, ref, k, cu_query, cu_ref)


@knn_op.register_fake
def _(query, ref, k, cu_query, cu_ref, backend):
    return query.new_empty((query.shape[0], k), dtype=torch.int64)


@torch.library.custom_op("ipcv_kernels::ngr_reconstruct", mutates_args=())
def ngr_reconstruct_op(
    base_drop: torch.Tensor,
    kept: torch.Tensor,
    base_kept: torch.Tensor,
    neighbors: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return resolve_backend("ngr_reconstruct", backend, base_drop.device).fn(base_drop, kept, base_kept, neighbors)


@ngr_reconstruct_op.register_fake
def _(base_drop, kept, base_kept, neighbors, backend):
    return torch.empty_like(base_drop)


@torch.library.custom_op("ipcv_kernels::ngr_restore", mutates_args=("out", "normed_out"))
def ngr_restore_op(
    out: torch.Tensor,
    kept: torch.Tensor,
    base_drop: torch.Tensor,
    base_kept: torch.Tensor,
    keep: torch.Tensor,
    drop: torch.Tensor,
    neighbors: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    norm_eps: float,
    normed_out: torch.Tensor | None,
    backend: str,
) -> None:
    impl = resolve_backend("ngr_restore", backend, out.device).fn
    impl(out, kept, base_drop, base_kept, keep, drop, neighbors, norm_weight, norm_bias, norm_eps, normed_out)


@ngr_restore_op.register_fake
def _(out, kept, base_drop, base_kept, keep, drop, neighbors, norm_weight, norm_bias, norm_eps, normed_out, backend):
    return None


@torch.library.custom_op("ipcv_kernels::ngr_attention", mutates_args=())
def ngr_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None,
    backend: str,
) -> torch.Tensor:
    impl = resolve_backend("ngr_attention", backend, q.device).fn
    return impl(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)


@ngr_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, backend):
    return torch.empty_like(q)


@torch.library.custom_op("ipcv_kernels::ngr_attention_fused", mutates_args=())
def ngr_attention_fused_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_rows: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    softmax_scale: float | None,
    backend: str,
) -> torch.Tensor:
    """``ngr_attention`` with rotary and/or a query-row gather fused in (backends that fuse them)."""
    impl = resolve_backend("ngr_attention_fused", backend, q.device).fn
    return impl(q, k, v, cu_seqlens_q, cu_seqlens_k, cos, sin, q_rows, q_positions, softmax_scale)


@ngr_attention_fused_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, cos, sin, q_rows, q_positions, softmax_scale, backend):
    num_q = q.shape[0] if q_rows is None else q_rows.shape[0]
    return q.new_empty((num_q, *q.shape[1:]))


@torch.library.custom_op("ipcv_kernels::select_tokens", mutates_args=())
def select_tokens_op(
    scores: torch.Tensor, cu_items: torch.Tensor, ratio: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(resolve_backend("select_tokens", backend, scores.device).fn(scores, cu_items, ratio))


@select_tokens_op.register_fake
def _(scores, cu_items, ratio, backend):
    # How many tokens an item keeps depends on the offsets' values: an unbacked size.
    num_keep = torch.library.get_ctx().new_dynamic_size()
    keep = scores.new_empty((num_keep,), dtype=torch.int64)
    drop = scores.new_empty((scores.shape[0] - num_keep,), dtype=torch.int64)
    return keep, drop, torch.empty_like(cu_items), torch.empty_like(cu_items)


@torch.library.custom_op("ipcv_kernels::plan", mutates_args=())
def plan_op(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = resolve_backend("plan", backend, x_after.device).fn
    return tuple(impl(x_before, x_after, cu_items, cu_seqlens, ratio, num_neighbors))


@plan_op.register_fake
def _(x_before, x_after, cu_items, cu_seqlens, ratio, num_neighbors, backend):
    num_keep = torch.library.get_ctx().new_dynamic_size()
    num_drop = x_after.shape[0] - num_keep
    return (
        x_after.new_empty((num_keep,), dtype=torch.int64),
        x_after.new_empty((num_drop,), dtype=torch.int64),
        torch.empty_like(cu_items),
        torch.empty_like(cu_items),
        x_after.new_empty((num_drop, num_neighbors), dtype=torch.int64),
        torch.empty_like(cu_seqlens),
    )
