"""``ngr_reconstruct``: neighbour-guided reconstruction of dropped tokens (NGR, spec step 4).

The public function, its input checks (shared with ``ngr_restore``, which reconstructs the same
rows), the custom op ``ipcv_kernels::ngr_reconstruct`` (and the fake of the compiled
``ipcv::ngr_reconstruct``), and the reference backend ``"torch"``.
"""

from __future__ import annotations

import torch

from .._validation import INDEX_DTYPES, check_float, check_same_dtype, check_tensor, check_width
from ..reference import ngr_reconstruct_reference
from ._custom_op import autograd_free, ipcv_op
from .dispatch import ALL_DEVICES, Backend, register_backend, resolve_backend


@autograd_free
def ngr_reconstruct(
    base_drop: torch.Tensor,
    kept: torch.Tensor,
    base_kept: torch.Tensor,
    neighbors: torch.Tensor,
    *,
    backend: str = "auto",
    skip_check: bool = False,
) -> torch.Tensor:
    """Neighbour-guided reconstruction of dropped tokens.

    ``recon[d] = base_drop[d] + mean over valid j of (kept - base_kept)[neighbors[d, j]]``

    Args:
        base_drop: ``[Nd, D]`` fp16/bf16/fp32/fp64, the dropped tokens' states at the prune layer.
        kept: ``[Nk, D]`` same dtype, the kept tokens' current states.
        base_kept: ``[Nk, D]`` same dtype, the kept tokens' states at the prune layer.
        neighbors: int32/int64 ``[Nd, k]`` rows of ``kept``, each in ``[-1, Nk)``; ``-1`` = invalid.
        backend: ``"auto"`` or a registered backend name.
        skip_check: skip the input checks (the range check of ``neighbors`` reads it back to the
            host). Wrong inputs are then not caught.

    Returns:
        ``[Nd, D]`` in ``base_drop``'s dtype; the mean is over valid neighbours only, accumulated in
        fp32 (fp64 for fp64), and a row without any valid neighbour equals ``base_drop``.
    """
    if not skip_check:
        check_float("base_drop", base_drop, ndim=2)
        check_reconstruction_inputs(base_drop, kept, base_kept, neighbors)
    return ngr_reconstruct_op(base_drop, kept, base_kept, neighbors, backend)


def check_reconstruction_inputs(base_drop: torch.Tensor, kept: object, base_kept: object, neighbors: object) -> None:
    """Check ``kept``, ``base_kept`` and ``neighbors`` against a checked ``base_drop`` (the NGR contract)."""
    check_float("kept", kept, ndim=2, device=base_drop.device)
    check_float("base_kept", base_kept, ndim=2, device=base_drop.device)
    for name, value in (("kept", kept), ("base_kept", base_kept)):
        check_same_dtype(name, value, "base_drop", base_drop)
        check_width(name, value, "base_drop", base_drop)
    if base_kept.shape != kept.shape:
        raise ValueError(f"base_kept must have the shape of kept {tuple(kept.shape)}, got {tuple(base_kept.shape)}")
    check_tensor("neighbors", neighbors, ndim=2, dtypes=INDEX_DTYPES, device=base_drop.device)
    if neighbors.shape[0] != base_drop.shape[0]:
        raise ValueError(
            f"neighbors must have {base_drop.shape[0]} rows (one per base_drop row), got {neighbors.shape[0]}"
        )
    if neighbors.numel() and (int(neighbors.min()) < -1 or int(neighbors.max()) >= kept.shape[0]):
        raise ValueError(f"neighbors must be in [-1, {kept.shape[0]}) (rows of kept, -1 = none)")


def _ngr_reconstruct_fake(
    base_drop: torch.Tensor, kept: torch.Tensor, base_kept: torch.Tensor, neighbors: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(base_drop)


@ipcv_op("ngr_reconstruct", fake=_ngr_reconstruct_fake, compiled=True)
def ngr_reconstruct_op(
    base_drop: torch.Tensor,
    kept: torch.Tensor,
    base_kept: torch.Tensor,
    neighbors: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return resolve_backend("ngr_reconstruct", backend, base_drop.device).fn(base_drop, kept, base_kept, neighbors)


register_backend("ngr_reconstruct", Backend("torch", ngr_reconstruct_reference, ALL_DEVICES))
