"""LLaVA-OneVision-1.5 vision tower (``LlavaOnevision15VisionModel``, RICE-ViT), bare or inside
``LlavaOnevision15ForConditionalGeneration``.

The tower takes Qwen-style packed patches (merge-unit order) and ``grid_thw`` rows, and prepends
one CLS row to every image and video frame before its blocks: block rows are ``[CLS, patches]``
per frame, one attention segment each (the tower's ``cu_seqlens`` already counts the CLS rows),
with a rotary row of its own for each CLS. Blocks are Qwen2-VL's (pre-norm LayerNorm, fused
``qkv``, 2-D rotary). After the last block the tower drops the CLS rows and merges 2 x 2 patches
(``merger``). Items are the ``grid_thw`` rows, ``t * (h * w + 1)`` rows each; every CLS row is
pinned: always kept, not counted, never a neighbour (spec §5.12).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import TowerCall
from ..engine.batched import plan_with_pinned_tokens
from ..reference import IPCVPlan
from ..selectors import merge_unit_grid
from .qwen2_vl import Qwen2VLAdapter, call_grid_thw


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """RICE-ViT: Qwen2-VL's blocks over frames that each start with a pinned CLS row."""

    name = "llava_onevision1_5"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "cls_embeddings") or not hasattr(tower, "blocks"):
            raise TypeError(f"the vision tower must be a LlavaOnevision15VisionModel, got {type(tower).__name__}")
        return tower.blocks

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items: the ``grid_thw`` rows, each frame's patches and its CLS row."""
        return TowerCall([int(t) * (int(h) * int(w) + 1) for t, h, w in call_grid_thw(args, kwargs).tolist()])

    def pinned_rows(self, cu_seqlens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        """Every segment's first row: its frame's CLS."""
        if padding is not None:
            raise ValueError(f"the {self.name} adapter has no padding rows to pin")
        return cu_seqlens[:-1].to(torch.int64)

    def plan(
        self,
        x_before: torch.Tensor,
        x_after: torch.Tensor,
        cu_items: torch.Tensor,
        cu_seqlens: torch.Tensor,
        config: IPCVConfig,
        padding: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> IPCVPlan:
        pinned = self.pinned_rows(cu_seqlens, padding)
        return plan_with_pinned_tokens(x_before, x_after, cu_items, cu_seqlens, pinned, config, scores)

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each frame its own part: its CLS row off the grid, then its patches in merge-unit order."""
        grid = call_grid_thw(args, kwargs).tolist()
        cells = merge_unit_grid(grid, tower.spatial_merge_size)
        frames = [int(h) * int(w) for t, h, w in grid for _ in range(int(t))]
        cls = torch.full((1, 3), -1, dtype=torch.int64)
        return torch.cat([piece for frame in cells.split(frames) for piece in (cls, frame)])
