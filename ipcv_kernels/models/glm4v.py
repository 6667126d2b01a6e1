"""GLM-4.1V / GLM-4.5V / GLM-4.6V vision tower (``Glm4vVisionModel``, ``Glm4vMoeVisionModel``).

A packed varlen tower as Qwen2-VL's: patches arrive in merge-unit order with ``grid_thw`` rows, a
3-D convolution embeds them, ``post_conv_layernorm`` (RMSNorm) normalises them, and learned
position embeddings on a square grid are resampled (bicubic) to each image's ``h x w`` and added,
all before block 0. Blocks: ``y = x + attn(norm1(x)); out = y + mlp(norm2(y))`` with RMSNorm, a
fused ``qkv`` (bias per ``attention_bias``), 2-D rotary on q and k (tables ``(cos, sin)``
``[n, Dh]``, ``rotate_half`` form) and one attention segment per image or video frame. After the
last block: ``post_layernorm``, a 2 x 2 strided convolution over each merge unit (``downsample``)
and the ``merger``. Nothing reads an intermediate block.

So Qwen2-VL's integration applies: items are the ``grid_thw`` rows, the last block restores every
token before ``post_layernorm`` / ``downsample`` (which need whole merge units), and the
stabilisation forward goes through ``norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` / ``mlp``.

Limit: the tower's ``hidden_states`` (``output_hidden_states=True``) of blocks ``P`` to
``depth - 2`` hold only the kept rows (what those blocks return); the last output is complete.
"""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class Glm4vAdapter(Qwen2VLAdapter):
    name = "glm4v"
