"""Kimi-K2.5 vision tower (``Kimi_K25VisionModel``, MoonViT), bare or inside
``Kimi_K25ForConditionalGeneration``.

The tower takes packed patches ``[n, 3, p, p]`` (each frame row-major) and ``grid_thw`` rows. Its
blocks (``tower.layers``) are pre-norm: ``y = x + attn(norm1(x)); out = y + mlp(norm2(y))``, with
separate ``q_proj`` / ``k_proj`` / ``v_proj`` (biased), 2-D axial rotary on q and k (tables
``(cos, sin)`` of shape ``[n, Dh]``) and one attention segment per ``grid_thw`` row: all frames of
a video clip attend to each other. After the last block come ``final_layernorm`` and the temporal
pooling (``temporal_merge``: every ``merge_kernel_size`` window of a frame, averaged over the
clip's frames); IPCV restores every token before them (spec §5.10). Items are the ``grid_thw``
rows; nothing is pinned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, FamilyAdapter, TowerCall
from ..ops import ngr_attention
from ..reference import IPCVPlan
from ..selectors import merge_unit_grid
from .qwen2_vl import call_grid_thw, grid_item_lengths


def separate_qkv_stabilised_block(
    block: nn.Module,
    kept: torch.Tensor,
    full: torch.Tensor,
    plan: IPCVPlan,
    call: BlockCall,
    config: IPCVConfig,
    kept_cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """Attention stabilisation for a pre-norm block with separate ``attn.{q,k,v}_proj`` and
    ``attn.proj`` (spec §3 step 5 with ``as_queries="kept"``).

    Args:
        kept: ``[Nk, D]`` kept states ``h``; full: ``[n, D]`` the restored sequence.
        kept_cu_seqlens: int32 ``[S + 1]`` the call's segments shrunk to the kept rows (queries);
            the keys' segments are ``call.cu_seqlens`` over ``full``.

    Returns:
        ``[Nk, D]``: ``y = kept + proj(attn)``, ``y + mlp(norm2(y))``. Only the kept rows pay for
        ``q_proj``; keys and values come from every row.
    """
    attention = block.attn
    width = full.shape[1]
    heads = attention.num_heads
    head_dim = width // heads
    normed = block.norm1(full)
    q = attention.q_proj(normed.index_select(0, plan.keep)).view(-1, heads, head_dim)
    k = attention.k_proj(normed).view(-1, heads, head_dim)
    v = attention.v_proj(normed).view(-1, heads, head_dim)
    rotary = call.position_embeddings
    attn = ngr_attention(
        q,
        k,
        v,
        kept_cu_seqlens,
        call.cu_seqlens.to(torch.int32),
        softmax_scale=attention.scaling,
        backend=config.attention_backend,
        rotary=rotary,
        q_positions=None if rotary is None else plan.keep,
        skip_check=True,
    )
    hidden = kept + attention.proj(attn.reshape(-1, width))
    return hidden + block.mlp(block.norm2(hidden))


class KimiK25Adapter(FamilyAdapter):
    """Kimi-K2.5's MoonViT tower; see the module docstring."""

    name = "kimi_k25"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "layers") or not hasattr(tower, "final_layernorm"):
            raise TypeError(f"the vision tower must be a Kimi_K25VisionModel, got {type(tower).__name__}")
        return tower.layers

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items: the ``grid_thw`` rows, ``t * h * w`` rows each (a clip's frames form one item)."""
        return TowerCall(grid_item_lengths(args, kwargs))

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each frame its own part, patches row-major (MoonViT packs no merge units)."""
        return merge_unit_grid(call_grid_thw(args, kwargs).tolist(), 1)

    def stabilised_block(
        self,
        block: nn.Module,
        kept: torch.Tensor,
        full: torch.Tensor,
        plan: IPCVPlan,
        call: BlockCall,
        config: IPCVConfig,
        kept_cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        return separate_qkv_stabilised_block(block, kept, full, plan, call, config, kept_cu_seqlens)
