"""Qwen3.5 vision tower (``Qwen3_5VisionModel``, ``Qwen3_5MoeVisionModel``).

The tower is Qwen3-VL's without DeepStack: the same pre-norm LayerNorm blocks with a fused ``qkv``
and 2-D rotary, learned position embeddings bilinearly resampled to each ``grid_thw`` row before
block 0, one attention segment per image or frame, and one ``merger`` (2 x 2 merge units) after
the last block; nothing reads an intermediate block. Items are the ``grid_thw`` rows, so
Qwen2-VL's integration applies as is: the last block restores every token before the merger.

The language model is hybrid (Gated DeltaNet linear-attention layers between full-attention
layers; the MoE variant routes each token's MLP through experts). LLM-side pruners (FastV, DART)
need a decoder of standard attention layers and are refused on it (``ipcv_kernels.llm``).

Limit: the tower's ``hidden_states`` (``output_hidden_states=True``) of blocks ``P`` to
``depth - 2`` hold only the kept rows (what those blocks return); the last output is complete.
"""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class Qwen3_5Adapter(Qwen2VLAdapter):
    name = "qwen3_5"
