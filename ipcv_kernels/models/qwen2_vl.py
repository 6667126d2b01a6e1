"""Qwen2-VL vision tower (``Qwen2VisionTransformerPretrainedModel``).

Block: ``y = x + attn(norm1(x)); out = y + mlp(norm2(y))``, attention with a fused ``qkv``
projection, 2-D rotary on q and k, and one attention segment per image or video frame. Items are
the rows of ``grid_thw``: ``t * h * w`` tokens each.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, FamilyAdapter, TowerCall
from ..ops import ngr_attention
from ..reference import IPCVPlan
from ..selectors import merge_unit_grid


def grid_item_lengths(args: tuple, kwargs: dict[str, Any]) -> list[int]:
    """``t * h * w`` of every ``grid_thw`` row of a ``tower(hidden_states, grid_thw)`` call."""
    grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
    return [int(t) * int(h) * int(w) for t, h, w in grid_thw.tolist()]


def call_grid_thw(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The ``grid_thw`` of a ``tower(hidden_states, grid_thw)`` call."""
    return kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]


def stabilised_prenorm_block(
    block: nn.Module,
    kept: torch.Tensor,
    full: torch.Tensor,
    plan: IPCVPlan,
    call: BlockCall,
    config: IPCVConfig,
    kept_cu_seqlens: torch.Tensor,
    *,
    qkv: nn.Linear,
    proj: nn.Linear,
    num_heads: int,
) -> torch.Tensor:
    """Attention stabilisation for a pre-norm block with a fused ``[q; k; v]`` projection.

    Keys and values come from every row of the normalised full sequence; queries only from the
    kept rows (``qkv`` is split by rows of its weight, so dropped rows never pay for ``W_q``).
    Then ``y = kept + proj(attn)``, ``out = y + mlp(norm2(y))`` on kept rows only.
    """
    width = full.shape[1]
    head_dim = width // num_heads
    normed = block.norm1(full)
    weight, bias = qkv.weight, qkv.bias
    q = F.linear(normed.index_select(0, plan.keep), weight[:width], None if bias is None else bias[:width])
    kv = F.linear(normed, weight[width:], None if bias is None else bias[width:])
    q = q.view(-1, num_heads, head_dim)
    k, v = kv.view(-1, 2, num_heads, head_dim).unbind(1)
    # Rotary: k at every row, q at its kept rows. The Triton backend (``auto`` on CUDA) rotates
    # them in one pass each and reads v through its strides (no contiguous copy); other backends
    # get the same rotation done by PyTorch.
    rotary = call.position_embeddings
    attn = ngr_attention(
        q,
        k,
        v,
        kept_cu_seqlens,
        call.cu_seqlens.to(torch.int32),
        backend=config.attention_backend,
        rotary=rotary,
        q_positions=None if rotary is None else plan.keep,
        skip_check=True,
    )
    hidden = kept + proj(attn.reshape(-1, width))
    return hidden + block.mlp(block.norm2(hidden))


class Qwen2VLAdapter(FamilyAdapter):
    name = "qwen2_vl"

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        return TowerCall(grid_item_lengths(args, kwargs))

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each image / video frame its own part, patches in merge-unit order."""
        return merge_unit_grid(call_grid_thw(args, kwargs).tolist(), tower.spatial_merge_size)

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
        return stabilised_prenorm_block(
            block,
            kept,
            full,
            plan,
            call,
            config,
            kept_cu_seqlens,
            qkv=block.attn.qkv,
            proj=block.attn.proj,
            num_heads=block.attn.num_heads,
        )
