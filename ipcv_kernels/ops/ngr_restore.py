"""``ngr_restore``: the full sequence from the kept rows and their NGR reconstructions, in place.

The public function, its input checks, the custom op ``ipcv_kernels::ngr_restore`` (and the fake
of the compiled ``ipcv::ngr_restore``, a CPU kernel; on CUDA the ``"cpp"`` backend wraps the
compiled reconstruction), and the reference backend ``"torch"``.
"""

from __future__ import annotations

import torch

from .._validation import INDEX_DTYPES, check_float, check_same_dtype, check_tensor, check_width
from ..reference import ngr_restore_reference
from ._custom_op import autograd_free, ipcv_op
from .dispatch import ALL_DEVICES, Backend, register_backend, resolve_backend
from .ngr_reconstruct import check_reconstruction_inputs


@autograd_free
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
        out: ``[n, D]`` fp16/bf16/fp32/fp64 with unit stride on the last dim, written in place.
        kept: ``[Nk, D]`` the kept tokens' current states; base_drop: ``[Nd, D]`` and base_kept:
            ``[Nk, D]`` the dropped / kept tokens' states at the prune layer; all in ``out``'s dtype.
        keep, drop: int32/int64 ``[Nk]`` / ``[Nd]`` rows of ``out``; together they hold every row
            once (``Nk + Nd = n``), as ``plan_ipcv``'s keep / drop do.
        neighbors: int32/int64 ``[Nd, k]`` rows of ``kept`` in ``[-1, Nk)`` (``-1`` = none).
        norm: an ``nn.LayerNorm`` over ``D`` (its weight and bias, ``[D]`` float, may be None);
            normed_out: ``[n, D]`` like ``out``. Both or neither.
        backend: ``"auto"`` or a registered backend name.
        skip_check: skip the input checks (as ``ngr_attention``'s): for callers that built the
            inputs from a plan themselves, since the row checks read indices back to the host.

    Returns:
        None: ``out`` (and ``normed_out``) hold the result.
    """
    if not skip_check:
        _check_restore_inputs(out, kept, base_drop, base_kept, keep, drop, neighbors, norm, normed_out)
    weight, bias, eps = (None, None, 0.0) if norm is None else (norm.weight, norm.bias, float(norm.eps))
    ngr_restore_op(out, kept, base_drop, base_kept, keep, drop, neighbors, weight, bias, eps, normed_out, backend)


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
    check_same_dtype("base_drop", base_drop, "out", out)
    check_width("base_drop", base_drop, "out", out)
    check_reconstruction_inputs(base_drop, kept, base_kept, neighbors)
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
        check_same_dtype("normed_out", normed_out, "out", out)
        if normed_out.shape != out.shape or normed_out.stride(-1) != 1:
            raise ValueError(f"normed_out must be {tuple(out.shape)} with a unit stride on its last dim")
        for name, value in (("norm.weight", norm.weight), ("norm.bias", norm.bias)):
            if value is not None:
                check_float(name, value, ndim=1, device=device)


def _ngr_restore_fake(*args: object) -> None:
    # The op's arguments (the schema below): it writes out / normed_out in place, returns nothing.
    return None


@ipcv_op("ngr_restore", fake=_ngr_restore_fake, mutates_args=("out", "normed_out"), compiled=True)
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


register_backend("ngr_restore", Backend("torch", ngr_restore_reference, ALL_DEVICES))
