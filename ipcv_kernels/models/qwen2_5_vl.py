"""Qwen2.5-VL vision tower (``Qwen2_5_VisionTransformerPretrainedModel``).

The tower reorders its tokens by ``window_index`` (the merge units of each window made
contiguous, item by item) before block 0 and undoes the order after its ``PatchMerger``. Blocks
alternate windowed attention (segments ``cu_window_seqlens``) with full attention per image or
frame (segments ``cu_seqlens``, blocks ``fullatt_block_indexes``); both kinds arrive as the block's
``cu_seqlens`` argument, over the reordered tokens.

IPCV needs nothing beyond Qwen2-VL's integration:

- items are the ``grid_thw`` rows, and the reordering keeps every item's tokens contiguous in
  packing order, so per-item selection and neighbours are unchanged (they depend on the set of
  tokens, not on their order);
- each block's segments, whatever their kind, are used over the original tokens in
  attention-stabilisation blocks and shrunk to the kept tokens in pruned blocks (the engine shrinks
  any segment tensor it has not planned with; a window may shrink or become empty);
- restoration writes the full sequence back in the tower's (reordered) layout, so the tower's own
  merger and inverse permutation produce the usual output order.

The block is pre-norm (RMSNorm) with a fused ``qkv`` projection and a gated MLP, which the shared
stabilisation forward of Qwen2-VL covers through ``block.norm1`` / ``block.norm2`` / ``block.mlp``.

Limit: the tower's ``hidden_states`` (``output_hidden_states=True``) of blocks ``P`` to
``depth - 2`` hold only the kept rows (what those blocks return); the last output is complete.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .qwen2_vl import Qwen2VLAdapter, call_grid_thw


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Qwen2-VL's grid, reordered by merge units as the tower reorders its tokens (``window_index``)."""
        grid = super().token_grid(tower, args, kwargs, hints)
        grid_thw = call_grid_thw(args, kwargs)
        if hasattr(tower, "get_window_index"):  # transformers <= 5.17: a method of the tower
            window_index, _ = tower.get_window_index(grid_thw)
        else:
            # Imported here: no family imports its transformers module until a model of it is patched.
            from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

            window_index, _ = modeling_qwen2_5_vl.get_vision_window_index(
                grid_thw,
                spatial_merge_size=tower.spatial_merge_size,
                window_size=tower.window_size,
                patch_size=tower.patch_size,
                kwargs={},
            )
        unit = tower.spatial_merge_size**2
        return grid.view(-1, unit, 3)[window_index.cpu()].reshape(-1, 3)
