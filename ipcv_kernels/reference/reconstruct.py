"""Pure-PyTorch reference for neighbour-guided reconstruction (NGR, spec step 4)."""

from __future__ import annotations

import torch

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
