"""LLM-side token pruners: which image / video tokens a decoder keeps from layer ``K`` on.

A pruner is a small frozen settings object with one method, ``select``: given what the decoder
computed up to layer ``K`` (``PruningInputs``) and how many candidates each row keeps, it returns
the kept candidate positions of every row. Everything else (finding the image tokens, counting,
slicing the decoder's inputs, the KV cache and the masks, generation) is the patch's job
(``ipcv_kernels.llm.patch``), shared by every pruner. The selection rules have pure-PyTorch
references in ``ipcv_kernels.reference.llm_pruning``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int, check_ratio
from ..reference.rotary import rotate_half


@dataclass
class PruningInputs:
    """What the decoder has computed when the pruner runs, at the input of layer ``K``.

    Attributes:
        layers: the decoder layers (``layers[K - 1]`` and ``layers[K]`` are the ones pruners read).
        hidden: ``[B, S, D]``, the hidden states entering layer ``K``.
        hidden_before: ``[B, S, D]``, the hidden states entering layer ``K - 1``.
        position_embeddings: the rotary ``(cos, sin)`` the text model passes to every layer,
            each ``[B or 1, S, head_dim]`` (Qwen2-VL's 3-D rotary already merged per channel).
        candidates: ``[B, S]`` bool, the prunable tokens (image / video tokens; never the last
            token, whose logits generation reads).
        text: ``[B, S]`` bool, the real (non-padding) tokens that are not image / video tokens.
        padding: ``[B, S]`` bool, padding tokens (masked out of attention).
    """

    layers: nn.ModuleList
    hidden: torch.Tensor
    hidden_before: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    candidates: torch.Tensor
    text: torch.Tensor
    padding: torch.Tensor


@dataclass(frozen=True)
class LLMPruner:
    """Base of the LLM-side pruners.

    Attributes:
        layer: ``K``, the first decoder layer that sees only the kept tokens;
            ``1 <= K < num_hidden_layers`` (checked against the model in ``apply_ipcv``; layer 0
            always holds every token, so the cache reports the unpruned length to ``generate``).
        ratio: ``R``, the fraction of each row's image / video tokens pruned, in ``[0, 1)``; a row
            keeps ``max(1, int(n * (1 - R)))`` of its ``n`` candidates. ``0`` changes nothing.
    """

    layer: int = 2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        check_int("layer", self.layer, low=1)
        object.__setattr__(self, "ratio", check_ratio("ratio", self.ratio))

    def check_depth(self, num_layers: int) -> None:
        """Validate ``layer`` against a decoder of ``num_layers`` layers."""
        check_int("layer", self.layer, low=1, high=num_layers)

    def select(self, inputs: PruningInputs, num_keep: list[int]) -> list[torch.Tensor]:
        """Sorted int64 positions of the kept candidates of each row, ``num_keep[b]`` of them."""
        raise NotImplementedError


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as the decoder applies it: ``x * cos + rotate_half(x) * sin``.

    ``x`` is ``[B, H, S, d]``; ``cos``/``sin`` are ``[B or 1, S, d]`` and broadcast over heads.
    """
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def decoder_last_query_and_keys(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Layer ``layer``'s rotary query of the last token and keys of all tokens.

    Computed from the layer's own modules (``input_layernorm``, ``self_attn.{q,k}_proj`` and, where
    the attention has them, its per-head ``q_norm`` / ``k_norm``), so it does not depend on the
    attention implementation: with sdpa / flash attention the model never materialises attention
    weights, and FastV needs only one row of them.

    Args:
        hidden: ``[B, S, D]``, the layer's input.
        position_embeddings: ``(cos, sin)``, each ``[B or 1, S, d]``.

    Returns:
        ``query [B, H, d]``, ``keys [B, H_kv, S, d]`` (input dtype) and the softmax scale.
    """
    attention = layer.self_attn
    head_dim = attention.head_dim
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    cos, sin = position_embeddings
    query = attention.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim)
    keys = attention.k_proj(normed).view(batch, length, -1, head_dim)
    if getattr(attention, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before the rotary
        query, keys = attention.q_norm(query), attention.k_norm(keys)
    query, keys = query.transpose(1, 2), keys.transpose(1, 2)
    if cos.shape[-1] < head_dim:
        # Partial rotary (GLM-4: the first dims, interleaved pairs): which dims and which pairing
        # only the model's own function knows, so it is applied as the attention applies it.
        own = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
        if own is None:
            raise TypeError(
                f"{type(attention).__name__} applies rotary to {cos.shape[-1]} of {head_dim} head dims and its module "
                "has no apply_rotary_pos_emb: FastV cannot reproduce its attention"
            )
        query = own(query, query, cos[:, -1:], sin[:, -1:])[0]
        keys = own(keys, keys, cos, sin)[1]
    else:
        query = apply_rotary(query, cos[:, -1:], sin[:, -1:])
        keys = apply_rotary(keys, cos, sin)
    scaling = float(getattr(attention, "scaling", head_dim**-0.5))
    return query[:, :, 0], keys, scaling


def fastv_received_attention(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, key_padding: torch.Tensor
) -> torch.Tensor:
    """Head-averaged attention probabilities from the last token to every token.

    Formula: ``mean_h softmax_j(q_h . k_{g(h), j} * scaling)`` over the non-padding keys ``j``, with
    ``g(h) = h // (H / H_kv)`` (grouped-query attention). The last token attends to every earlier
    token, so no causal mask is needed; memory is ``O(B * H * S)``, one row of the attention.

    Args:
        query: ``[B, H, d]``; keys: ``[B, H_kv, S, d]``; key_padding: ``[B, S]`` bool.

    Returns:
        ``[B, S]`` in float32 (float64 for float64 inputs).
    """
    batch, heads, head_dim = query.shape
    groups = heads // keys.shape[1]
    dtype = torch.promote_types(query.dtype, torch.float32)
    grouped = query.to(dtype).view(batch, keys.shape[1], groups, head_dim)
    logits = torch.einsum("bkgd,bksd->bkgs", grouped, keys.to(dtype)) * scaling
    logits = logits.masked_fill(key_padding[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))


@dataclass(frozen=True)
class FastV(LLMPruner):
    """FastV (Chen et al., 2024): at layer ``K``, keep the image tokens that received the most
    attention from the last token in layer ``K - 1`` (averaged over heads).

    The scores are computed from layer ``K - 1``'s projections (one query row), so eager attention
    is not required. Defaults: the paper's ``K = 2``, ``R = 0.5``.
    """

    def select(self, inputs: PruningInputs, num_keep: list[int]) -> list[torch.Tensor]:
        query, keys, scaling = decoder_last_query_and_keys(
            inputs.layers[self.layer - 1], inputs.hidden_before, inputs.position_embeddings
        )
        received = fastv_received_attention(query, keys, scaling, inputs.padding)
        kept = []
        for row, count in enumerate(num_keep):
            positions = inputs.candidates[row].nonzero().flatten()
            best = received[row, positions].topk(count).indices
            kept.append(positions[best].sort().values)
        return kept


@dataclass(frozen=True)
class DART(LLMPruner):
    """DART (Wen et al., 2025): duplication-aware pruning at layer ``K``.

    Pivots are the image tokens and the text tokens with the largest key L1 norms (layer ``K``'s
    ``k_proj(input_layernorm(h))``, before rotary); the image pivots are kept, and each pivot then
    keeps its share of the image tokens least similar to it (cosine on the hidden states entering
    layer ``K``), until ``max(1, int(n * (1 - R)))`` image tokens are kept. See
    ``dart_select_reference`` for the exact rule. Defaults: the paper's ``K = 2``, ``R = 0.778``.

    Attributes:
        pivot_image_tokens: image pivots per row, ``>= 1``.
        pivot_text_tokens: text pivots per row, ``>= 0``.
    """

    ratio: float = 0.778
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("pivot_image_tokens", self.pivot_image_tokens, low=1)
        check_int("pivot_text_tokens", self.pivot_text_tokens, low=0)

    def select(self, inputs: PruningInputs, num_keep: list[int]) -> list[torch.Tensor]:
        layer = inputs.layers[self.layer]
        keys = layer.self_attn.k_proj(layer.input_layernorm(inputs.hidden))
        key_norms = keys.to(torch.promote_types(keys.dtype, torch.float32)).abs().sum(dim=-1)
        return [
            dart_select_row(
                inputs.hidden[row],
                key_norms[row],
                inputs.candidates[row],
                inputs.text[row],
                count,
                self.pivot_image_tokens,
                self.pivot_text_tokens,
            )
            for row, count in enumerate(num_keep)
        ]


def dart_select_row(
    hidden: torch.Tensor,
    key_norms: torch.Tensor,
    candidates: torch.Tensor,
    text: torch.Tensor,
    num_keep: int,
    pivot_image_tokens: int,
    pivot_text_tokens: int,
) -> torch.Tensor:
    """DART's rule for one row (``dart_select_reference``), with tensor masks instead of sets.

    Memory is ``O(P * n)`` for ``P`` pivots and ``n`` candidates: one similarity row per pivot.

    Args:
        hidden: ``[S, D]``; key_norms: ``[S]`` key L1 norms (float32 or float64); candidates,
            text: ``[S]`` bool. Similarities are computed in float32 at least.

    Returns:
        ``[num_keep]`` int64, sorted kept candidate positions.
    """
    positions = candidates.nonzero().flatten()
    if num_keep == 0:
        return positions[:0]
    text_positions = text.nonzero().flatten()
    image_pivots = key_norms[positions].topk(min(pivot_image_tokens, num_keep)).indices  # into positions
    text_pivots = text_positions[key_norms[text_positions].topk(min(pivot_text_tokens, len(text_positions))).indices]
    pivots = torch.cat([positions[image_pivots], text_pivots]).sort().values
    taken = torch.zeros(len(positions), dtype=torch.bool, device=hidden.device)
    taken[image_pivots] = True
    share, extra = divmod(num_keep - len(image_pivots), len(pivots))
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    normed = F.normalize(hidden[positions].to(dtype), dim=-1)
    for j, pivot in enumerate(pivots.tolist()):
        quota = share + (1 if j < extra else 0)
        if quota == 0:
            continue
        similarity = normed @ F.normalize(hidden[pivot].to(dtype), dim=0)
        similarity = similarity.masked_fill(taken, float("inf"))
        taken[similarity.topk(quota, largest=False).indices] = True
    return positions[taken]
