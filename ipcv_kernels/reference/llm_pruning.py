"""Pure-PyTorch references of the LLM-side token pruners' selection rules (FastV and DART).

Each function handles ONE sequence (no batch dimension) the straightforward way, materialising
what it needs (FastV: the full ``S x S`` causal attention), so that the batched fast paths in
``ipcv_kernels.llm`` can be checked against it. Positions are indices into the sequence; the
result is the sorted positions of the candidate (image / video) tokens that are kept.
"""

from __future__ import annotations

import torch

from .selection import keep_count

# Candidate tokens kept out of ``n`` when a fraction ``ratio`` is pruned: the vision-side rule, also
# 0 for an input without image tokens (which prunes nothing). The LLM pruners import it by this name.
llm_keep_count = keep_count


def fastv_attention_reference(
    query: torch.Tensor, key: torch.Tensor, scaling: float, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-averaged attention that each token receives from the LAST token, via the full matrix.

    Args:
        query: ``[H, S, d]`` float, rotary already applied.
        key: ``[H_kv, S, d]`` float, rotary already applied; ``H`` must be a multiple of ``H_kv``
            (grouped-query attention: query head ``h`` reads key head ``h // (H / H_kv)``).
        scaling: the softmax scale (``d ** -0.5`` for Qwen2-VL).
        key_padding: ``[S]`` bool, ``True`` for padding tokens (never attended), or ``None``.

    Returns:
        ``[S]`` float64: row ``S - 1`` of the causal attention probabilities, averaged over heads.
    """
    heads, length, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[0], dim=0).double()
    logits = query.double() @ key.transpose(1, 2) * scaling  # [H, S, S]
    blocked = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    if key_padding is not None:
        blocked = blocked | key_padding[None, :]
    probs = logits.masked_fill(blocked, float("-inf")).softmax(dim=-1)
    return probs[:, -1, :].mean(dim=0)


def fastv_select_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    candidates: torch.Tensor,
    num_keep: int,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """FastV: keep the ``num_keep`` candidates that receive the most attention from the last token.

    Args:
        query, key, scaling, key_padding: as in ``fastv_attention_reference`` (layer ``K - 1``).
        candidates: ``[S]`` bool, the prunable (image / video) tokens.
        num_keep: how many candidates to keep, ``0 <= num_keep <= candidates.sum()``.

    Returns:
        ``[num_keep]`` int64, sorted positions of the kept candidates.
    """
    received = fastv_attention_reference(query, key, scaling, key_padding)
    positions = candidates.nonzero().flatten()
    best = received[positions].topk(num_keep).indices
    return positions[best].sort().values


def dart_select_reference(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    candidates: torch.Tensor,
    text: torch.Tensor,
    num_keep: int,
    pivot_image_tokens: int,
    pivot_text_tokens: int,
) -> torch.Tensor:
    """DART: keep pivots and the candidates least similar to them (duplication-aware pruning).

    1. Image pivots: the ``min(pivot_image_tokens, num_keep)`` candidates with the largest key L1
       norm; they are kept. Text pivots: the ``min(pivot_text_tokens, text.sum())`` text tokens
       with the largest key L1 norm.
    2. The other ``num_keep - |image pivots|`` kept candidates are shared among the pivots in
       position order: with ``P`` pivots, pivot ``j`` gets ``q // P`` plus one if ``j < q % P``.
    3. Each pivot in turn takes its share: the not yet kept candidates with the lowest cosine
       similarity (on ``hidden``) to the pivot.

    Args:
        hidden: ``[S, D]`` float, the hidden states entering the pruning layer.
        keys: ``[S, D_k]`` float, that layer's key projections of ``hidden`` (before rotary).
        candidates: ``[S]`` bool, the prunable (image / video) tokens.
        text: ``[S]`` bool, the tokens that may serve as text pivots.
        num_keep: how many candidates to keep, ``0 <= num_keep <= candidates.sum()``.
        pivot_image_tokens: ``>= 1``. pivot_text_tokens: ``>= 0``.

    Returns:
        ``[num_keep]`` int64, sorted positions of the kept candidates.
    """
    norms = keys.double().abs().sum(dim=-1)
    positions = candidates.nonzero().flatten().tolist()
    text_positions = text.nonzero().flatten().tolist()
    if num_keep == 0:
        return torch.empty(0, dtype=torch.int64, device=hidden.device)

    def largest_norms(pool: list[int], count: int) -> list[int]:
        return sorted(pool, key=lambda p: float(norms[p]), reverse=True)[:count]

    image_pivots = largest_norms(positions, min(pivot_image_tokens, num_keep))
    text_pivots = largest_norms(text_positions, min(pivot_text_tokens, len(text_positions)))
    kept = list(image_pivots)
    remaining = [p for p in positions if p not in image_pivots]
    pivots = sorted(image_pivots + text_pivots)
    share, extra = divmod(num_keep - len(image_pivots), len(pivots))
    for j, pivot in enumerate(pivots):
        quota = share + (1 if j < extra else 0)
        similarity = {
            p: float(torch.nn.functional.cosine_similarity(hidden[pivot].double(), hidden[p].double(), dim=0))
            for p in remaining
        }
        chosen = sorted(remaining, key=lambda p: similarity[p])[:quota]
        kept += chosen
        remaining = [p for p in remaining if p not in chosen]
    return torch.tensor(sorted(kept), dtype=torch.int64, device=hidden.device)
