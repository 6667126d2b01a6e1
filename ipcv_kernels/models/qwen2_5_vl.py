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

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
