"""MiniCPM-V 4.6 / 4.7 vision tower (``MiniCPMV4_6VisionModel``, ``MiniCPMV4_7VisionModel``: the
same tower under two names), bare or inside ``MiniCPMV4_6ForConditionalGeneration`` /
``MiniCPMV4_7ForConditionalGeneration`` (spec §5.14).

**The call.** ``tower(pixel_values [1, C, p, n p], target_sizes [S, 2], use_vit_merger=True)``:
every slice (the source image, then the crops of a sliced image) is ``h x w`` patches, all packed
row-major into one sequence ``[1, n, D]``. The SigLIP blocks (``tower.encoder.layers``) are called
``layer(hidden [1, n, D], attention_mask=None, cu_seqlens=..., max_seqlen=...)``, one segment
per slice. After block ``insert_layer_id`` (``I``) the tower's ``vit_merger`` merges each 2 x 2
window into one row; the later blocks take ``n / 4`` rows with the downsampled ``cu_seqlens``
(``use_vit_merger=False``, the model's ``"4x"`` mode, skips that merge).

**Where IPCV applies.** Only to blocks after the merge: ``prune_layer >= I + 2``, so that block
``P - 1`` (whose input the default score compares with block ``P``'s) runs after it too. Smaller
prune layers are refused with a ``ValueError`` when the patch is built (``check_config``).

**Items** are the slices (the ``target_sizes`` rows, one attention segment each): the tower's
call carries no grouping of slices into images. An item holds ``(h / 2) (w / 2)`` rows (``h w``
without the merge). Nothing is pinned. The last block restores every row before
``post_layernorm``; the model's ``Merger`` after the tower sees every token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, FamilyAdapter, ForwardState, TowerCall
from ..ops import ngr_attention
from ..reference import IPCVPlan
from ..selectors import token_grid


def slice_grids(args: tuple, kwargs: dict[str, Any], merged: bool) -> list[tuple[int, int]]:
    """``(rows, columns)`` of every slice of a ``tower(pixel_values, target_sizes, ...)`` call as the
    blocks after the merge see them (halved where ``merged``)."""
    target_sizes = kwargs["target_sizes"] if "target_sizes" in kwargs else (args[1] if len(args) > 1 else None)
    if target_sizes is None:
        raise ValueError("the MiniCPM-V tower call needs target_sizes (one (h, w) row per slice)")
    sizes = target_sizes.tolist() if isinstance(target_sizes, torch.Tensor) else list(target_sizes)
    if merged:
        for h, w in sizes:
            if int(h) % 2 or int(w) % 2:
                raise ValueError(f"target_sizes: a slice of {h} x {w} patches cannot be merged 2 x 2")
        return [(int(h) // 2, int(w) // 2) for h, w in sizes]
    return [(int(h), int(w)) for h, w in sizes]


def check_prune_layer(insert_layer: int, config: IPCVConfig) -> None:
    """Refuse (``ValueError`` naming ``prune_layer`` and ``insert_layer_id``) a prune layer before
    block ``insert_layer + 2``, the first whose input and whose previous block's input both follow
    the in-tower merge (spec §5.14); a tower without the merge (``insert_layer < 0``) takes any."""
    first = insert_layer + 2
    if insert_layer >= 0 and config.prune_layer < first:
        raise ValueError(
            f"prune_layer must be >= insert_layer_id + 2 = {first} on a MiniCPM-V tower (got "
            f"{config.prune_layer}): its vit_merger merges 2 x 2 tokens after block {insert_layer}, "
            "and IPCV applies only to blocks whose input and whose previous block's input both follow it"
        )


class MiniCPMVAdapter(FamilyAdapter):
    """``MiniCPMV4_6VisionModel`` / ``MiniCPMV4_7VisionModel``; see the module docstring."""

    name = "minicpmv"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "vit_merger") or not hasattr(tower, "encoder"):
            raise TypeError(f"the vision tower must be a MiniCPMV4_6VisionModel, got {type(tower).__name__}")
        self._insert_layer = int(tower.config.insert_layer_id)
        return tower.encoder.layers

    def check_config(self, tower: nn.Module, config: IPCVConfig) -> None:
        """Refuse a prune layer at or before the block after the in-tower merge (spec §5.14)."""
        check_prune_layer(self._insert_layer, config)

    # -- the call ---------------------------------------------------------------------------------
    def _merged(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        use_vit_merger = (
            kwargs["use_vit_merger"] if "use_vit_merger" in kwargs else (args[2] if len(args) > 2 else True)
        )
        return bool(use_vit_merger) and self._insert_layer >= 0

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items: the slices, ``rows * columns`` tokens each as the blocks from ``P`` on see them."""
        return TowerCall([rows * cols for rows, cols in slice_grids(args, kwargs, self._merged(args, kwargs))])

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each slice its own part, its (merged) tokens row-major."""
        grids = slice_grids(args, kwargs, self._merged(args, kwargs))
        return token_grid([(1, rows, cols) for rows, cols in grids], cls=False)

    # -- the blocks ---------------------------------------------------------------------------------
    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])

    def unpack(self, packed: torch.Tensor, layout: torch.Size) -> torch.Tensor:
        return packed.view(layout)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        """``layer(hidden [1, n, D], attention_mask=None, cu_seqlens=..., max_seqlen=...)`` (the
        ``"4x"`` path passes the mask by position)."""
        kwargs = dict(kwargs)
        return BlockCall(kwargs.pop("cu_seqlens"), None, args, kwargs)

    def run_block(
        self,
        block: nn.Module,
        forward: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        call: BlockCall,
        config: IPCVConfig,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """The model's layer on rows ``[N, D]`` (given as ``[1, N, D]``) in segments ``cu_seqlens``;
        returns ``[N, D]``. ``max_seqlen`` replaces the tower's where it passed one (flash)."""
        kwargs = dict(call.kwargs)
        if max_seqlen is not None and kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = max_seqlen
        cu_seqlens = cu_seqlens.to(device=hidden.device, dtype=torch.int32)
        out = forward(hidden.unsqueeze(0), *call.args, cu_seqlens=cu_seqlens, **kwargs)
        return out.reshape(-1, hidden.shape[-1])

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
        """Queries of the kept rows ``[Nk, D]`` over keys / values of every row of ``full``
        ``[n, D]``, per slice; returns the block's output at the kept rows ``[Nk, D]``."""
        if plan.drop.shape[0] == 0:  # nothing dropped: every row is a query, the model's own layer
            # The class's forward: the instance's is the patch's wrapper.
            forward = functools.partial(type(block).forward, block)
            return self.run_block(block, forward, full, call.cu_seqlens, None, call, config)[plan.keep]
        attention = block.self_attn
        heads, head_dim = attention.num_heads, attention.head_dim
        normed = block.layer_norm1(full)
        q = attention.q_proj(normed.index_select(0, plan.keep)).view(-1, heads, head_dim)
        k = attention.k_proj(normed).view(-1, heads, head_dim)
        v = attention.v_proj(normed).view(-1, heads, head_dim)
        attended = ngr_attention(
            q,
            k,
            v,
            kept_cu_seqlens,
            call.cu_seqlens.to(device=full.device, dtype=torch.int32),
            softmax_scale=attention.scaling,
            backend=config.attention_backend,
            skip_check=True,
        )
        hidden = kept + attention.out_proj(attended.reshape(kept.shape[0], -1))
        return hidden + block.mlp(block.layer_norm2(hidden))
