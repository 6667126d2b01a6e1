"""``knn``: segment-aware k-nearest-neighbour search (spec step 3).

The public function, its input checks, the custom op ``ipcv_kernels::knn`` (and the fake of the
compiled ``ipcv::knn``), and the reference backend ``"torch"``.
"""

from __future__ import annotations

import torch

from .._validation import check_float, check_int, check_paired_offsets, check_same_dtype, check_width
from ..reference import knn_reference
from ._custom_op import autograd_free, ipcv_op
from .dispatch import ALL_DEVICES, Backend, register_backend, resolve_backend


@autograd_free
def knn(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    cu_query: torch.Tensor | None = None,
    cu_ref: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    skip_check: bool = False,
) -> torch.Tensor:
    """Segment-aware k-nearest-neighbour search by Euclidean distance.

    Args:
        query: ``[Nq, D]`` fp16/bf16/fp32/fp64, the query rows.
        ref: ``[Nr, D]``, the reference rows, same dtype and device as ``query``.
        k: neighbours per query row, ``>= 1``.
        cu_query, cu_ref: optional int32 ``[B + 1]`` offsets, given together and of equal length;
            query segment ``b`` searches only ref segment ``b``. ``None``: one segment.
        backend: ``"auto"`` or a registered backend name.
        skip_check: skip the input checks (for callers that built the inputs themselves: the
            offset checks read them back to the host). Wrong inputs are then not caught.

    Returns:
        int64 ``[Nq, k]``: global row indices into ``ref``, nearest first. Where the segment has
        fewer than ``k`` ref rows the missing slots are ``-1``. Distances are computed in fp32
        (fp64 for fp64 inputs); ties are broken arbitrarily.
    """
    if not skip_check:
        _check_knn_inputs(query, ref, k, cu_query, cu_ref)
    return knn_op(query, ref, k, cu_query, cu_ref, backend)


def _check_knn_inputs(query: object, ref: object, k: object, cu_query: object, cu_ref: object) -> None:
    check_float("query", query, ndim=2)
    check_float("ref", ref, ndim=2, device=query.device)
    check_same_dtype("ref", ref, "query", query)
    check_width("ref", ref, "query", query)
    check_int("k", k, low=1)
    check_paired_offsets("cu_query", cu_query, query.shape[0], "cu_ref", cu_ref, ref.shape[0], query.device)


def _knn_fake(query: torch.Tensor, ref: torch.Tensor, k: int, *offsets: torch.Tensor | None) -> torch.Tensor:
    return query.new_empty((query.shape[0], k), dtype=torch.int64)


@ipcv_op("knn", fake=_knn_fake, compiled=True)
def knn_op(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    cu_query: torch.Tensor | None,
    cu_ref: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return resolve_backend("knn", backend, query.device).fn(query, ref, k, cu_query, cu_ref)


register_backend("knn", Backend("torch", knn_reference, ALL_DEVICES))
