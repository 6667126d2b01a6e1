"""Pure-PyTorch reference for neighbour-guided reconstruction (NGR, spec step 4) and the full
sequence it restores (spec steps 4 and 7)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .knn import accumulation_dtype


def ngr_reconstruct_reference(
    base_drop: torch.Tensor,
    kept: torch.Tensor,
    base_kept: torch.Tensor,
    neighbors: torch.Tensor,
) -> torch.Tensor:
    """``recon[d] = base_drop[d] + mean_{j valid} (kept - base_kept)[neighbors[d, j]]``.

    Args:
        base_drop: ``[Nd, D]`` float, the dropped tokens' states at the prune layer.
        kept: ``[Nk, D]`` float, the kept tokens' current states.
        base_kept: ``[Nk, D]`` float, the kept tokens' states at the prune layer.
        neighbors: integer ``[Nd, k]`` rows of ``kept``; ``-1`` marks an invalid slot.

    Returns:
        ``[Nd, D]`` in ``base_drop``'s dtype. A row with no valid neighbour equals ``base_drop``.
        The mean accumulates in fp32 (fp64 for fp64 inputs).
    """
    acc = accumulation_dtype(base_drop.dtype)
    if neighbors.shape[0] == 0 or kept.shape[0] == 0:
        return base_drop.clone()
    valid = neighbors >= 0
    delta = kept.to(acc) - base_kept.to(acc)
    gathered = delta[neighbors.clamp_min(0).long()]  # [Nd, k, D]
    gathered = gathered * valid[..., None].to(acc)
    count = valid.sum(1, keepdim=True).clamp_min(1).to(acc)
    return (base_drop.to(acc) + gathered.sum(1) / count).to(base_drop.dtype)


def ngr_restore_reference(
    out: torch.Tensor,
    kept: torch.Tensor,
    base_drop: torch.Tensor,
    base_kept: torch.Tensor,
    keep: torch.Tensor,
    drop: torch.Tensor,
    neighbors: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    normed_out: torch.Tensor | None = None,
    *,
    reconstruct: Callable[..., torch.Tensor] = ngr_reconstruct_reference,
) -> None:
    """The full sequence, written in place: ``out[keep] = kept``, ``out[drop] = NGR reconstruction``.

    With ``normed_out``, also ``normed_out = layer_norm(out, norm_weight, norm_bias, norm_eps)``
    over the last dim (statistics in fp32 of the rows as stored in ``out``'s dtype, as
    ``torch.nn.functional.layer_norm``): the next block's ``norm1`` of the restored sequence.

    Args:
        out: ``[n, D]`` float, written in place; normed_out: ``[n, D]`` like ``out``, or None.
        kept: ``[Nk, D]``; base_drop: ``[Nd, D]``; base_kept: ``[Nk, D]``; all in ``out``'s dtype.
        keep, drop: integer ``[Nk]`` / ``[Nd]`` rows of ``out``, together each row exactly once.
        neighbors: integer ``[Nd, k]`` rows of ``kept``; ``-1`` marks an invalid slot.
        norm_weight, norm_bias: ``[D]`` or None (1 and 0).
        reconstruct: the NGR implementation (the ``cpp`` backend passes its compiled one).
    """
    out[keep] = kept
    out[drop] = reconstruct(base_drop, kept, base_kept, neighbors)
    if normed_out is not None:
        normed_out.copy_(F.layer_norm(out, (out.shape[-1],), norm_weight, norm_bias, norm_eps))
