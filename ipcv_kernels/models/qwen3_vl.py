"""Qwen3-VL vision tower (``Qwen3VLVisionModel``).

Blocks are Qwen2-VL's (pre-norm LayerNorm, fused ``qkv``, 2-D rotary, one attention segment per
image or frame) and items are the ``grid_thw`` rows. What is new are the DeepStack taps: after each
block in ``deepstack_visual_indexes`` the tower feeds that block's output to a
``deepstack_merger_list`` merger, whose features go to early LLM layers. Under IPCV a block in the
pruned stretch returns only the kept tokens, so a forward pre-hook on every DeepStack merger
restores the dropped ones first, exactly as for the final output (NGR from the current kept states,
``IPCVPatch.restore_inputs``): every tap sees the full token count, in the usual order.

Limit: the tower's ``hidden_states`` (``output_hidden_states=True``) of blocks ``P`` to
``depth - 2`` hold only the kept rows (what those blocks return); the last output is complete.
"""

from __future__ import annotations

from ..engine import IPCVPatch
from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"

    def install_hooks(self, patch: IPCVPatch) -> None:
        patch.restore_inputs(patch.tower.deepstack_merger_list)
