"""The vision-tower shapes of real checkpoints, as their configs' fields: the family table's presets
(``Family.presets``) build towers of these shapes with seeded random weights for the benchmarks,
the demo and the fidelity tool.

``QWEN2_VL_7B_VISION`` is the vision tower of Qwen2-VL-7B-Instruct (``Qwen2VLVisionConfig``: depth
32, width 1280, 16 heads, MLP 5120 = 4 x 1280, output 3584); Qwen2-VL-2B's differs only in its
output width (1536). ``QWEN2_5_VL_7B_VISION`` is Qwen2.5-VL-7B-Instruct's (depth 32, width 1280, 16
heads, gated SiLU MLP 3420, RMSNorm, output 3584, attention in 112-pixel windows except in blocks
7, 15, 23 and 31). The ``-d8`` presets keep a tower's real block shapes (so GEMM shapes and
per-block costs are the real ones) at depth 8, so that a CPU run stays short.
"""

from __future__ import annotations

from typing import Any

QWEN2_VL_7B_VISION: dict[str, Any] = dict(
    depth=32,
    embed_dim=1280,
    num_heads=16,
    mlp_ratio=4,
    hidden_size=3584,
    hidden_act="quick_gelu",
    patch_size=14,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
)

QWEN2_5_VL_7B_VISION: dict[str, Any] = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    hidden_act="silu",
    patch_size=14,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)

# Qwen3-VL-8B-Instruct's vision tower (``Qwen3VLVisionConfig``): 16-pixel patches, DeepStack
# mergers after blocks 8, 16 and 24.
QWEN3_VL_8B_VISION: dict[str, Any] = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    out_hidden_size=4096,
    hidden_act="gelu_pytorch_tanh",
    patch_size=16,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)

# LLaVA-1.5-7B's tower, CLIP ViT-L/14-336 (``CLIPVisionConfig``): 24 blocks, 577 tokens (CLS + 24 x 24).
CLIP_VIT_L_336: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)

# Gemma 3's tower, SigLIP-So400m/14 at 896 pixels (``SiglipVisionConfig``): 27 blocks, 4,096
# tokens, no CLS, no pooling head (``vision_use_head=False``, as Gemma 3 configures it).
SIGLIP_SO400M_896: dict[str, Any] = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,
)

# InternVL2.5-8B's tower, InternViT-300M-448px (``InternVLVisionConfig``): 24 blocks, 448-pixel
# tiles of 1,025 tokens (CLS + 32 x 32), LayerNorm, no QK-norm, layer scale.
INTERNVIT_300M: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=448,
    patch_size=14,
    use_qk_norm=False,
    norm_type="layer_norm",
    layer_scale_init_value=0.1,
    hidden_act="gelu",
)

# LLaVA-OneVision-7B's tower, SigLIP-So400m/14-384 (``SiglipVisionConfig``): 729 tokens a crop, no
# CLS, no pooling head; the checkpoint keeps 26 of SigLIP's 27 blocks.
SIGLIP_SO400M_384_ONEVISION: dict[str, Any] = {**SIGLIP_SO400M_896, "image_size": 384, "num_hidden_layers": 26}

# Idefics3-8B-Llama3's tower (``Idefics3VisionConfig``): SigLIP-So400m/14 blocks over 364-pixel
# sub-images of 26 x 26 = 676 patches, no CLS.
IDEFICS3_8B_VISION: dict[str, Any] = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=364,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
)

# LLaVA-NeXT-7B's anyres resolutions (llava-v1.6-vicuna-7b / -mistral-7b) and LLaVA-OneVision's
# (1 x 1 to 6 x 6 crops of 384), (height, width) in pixels.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7))

# Qwen3.5's vision tower (``Qwen3_5VisionConfig``; Qwen3.5-27B and Qwen3.5-397B-A17B share it):
# Qwen3-VL-8B's blocks without DeepStack, merger output 4096 (Qwen3.5-397B-A17B's text width).
QWEN3_5_VISION: dict[str, Any] = {
    key: value for key, value in QWEN3_VL_8B_VISION.items() if key != "deepstack_visual_indexes"
}

# Gemma 4's tower (``Gemma4VisionConfig``'s defaults, transformers' reference checkpoint
# google/gemma-4-e2b-it): 16 blocks of width 768 (12 heads of 64), a gated MLP of 3072, 16-pixel
# patches pooled 3 x 3 after the tower; the processor's default budget of 280 soft tokens is a
# padded row of 2520 patches per image (``bench.calls.PatchCalls``).
GEMMA4_VISION: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=12,
    head_dim=64,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=10240,
    default_output_length=280,
)

# Kimi-K2.5's tower, MoonViT (``Kimi_K25VisionConfig``; moonshotai/Kimi-K2.5, the same as
# transformers' defaults, which name moonshotai/Kimi-K2.6): 27 blocks of width 1152 over 14-pixel
# patches, a 64 x 64 learned position grid resampled per image, clips of up to 4 frames, pooled 2 x 2.
KIMI_K25_VISION: dict[str, Any] = dict(
    patch_size=14,
    pos_emb_height=64,
    pos_emb_width=64,
    pos_emb_time=4,
    num_attention_heads=16,
    num_hidden_layers=27,
    hidden_size=1152,
    intermediate_size=4304,
    hidden_act="gelu_pytorch_tanh",
    merge_kernel_size=[2, 2],
)

# Mistral 3's tower (Mistral-Small-3.1-24B-Instruct-2503, ``PixtralVisionConfig``): Pixtral's ViT,
# 24 blocks of width 1024 (16 heads of 64), gated SiLU MLP of 4096, 14-pixel patches, images up to
# 1540 pixels a side at their own resolution, 2-D axial rotary; the 2 x 2 patch merger is the
# model's, after the tower.
MISTRAL3_PIXTRAL_VISION: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    head_dim=64,
    image_size=1540,
    patch_size=14,
    hidden_act="silu",
    rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
)

# LLaVA-OneVision-1.5-8B's tower, RICE-ViT-L/14 (``LlavaOnevision15VisionConfig``; Deep-VLM /
# lmms-lab LLaVA-OneVision-1.5-8B-Instruct): 24 blocks of width 1024 over 14-pixel patches, a CLS
# row before every image or frame, 2 x 2 patches merged to the decoder's width (Qwen3-8B, 4096).
ONEVISION1_5_8B_VISION: dict[str, Any] = dict(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    out_hidden_size=4096,
    hidden_act="gelu",
)

# GLM-4.1V-9B's vision tower (``Glm4vVisionConfig``'s defaults, zai-org/GLM-4.1V-9B-Thinking; GLM-4.5V
# and GLM-4.6V keep its shape): 24 RMSNorm blocks of width 1536, 12 heads, gated MLP of width 4096
# (``out_hidden_size``), 14-pixel patches, position embeddings on a 24 x 24 grid (336 pixels),
# downsampling convolution and merger (width 13696) after the tower.
GLM4V_9B_VISION: dict[str, Any] = dict(
    depth=24,
    hidden_size=1536,
    num_heads=12,
    intermediate_size=13696,
    out_hidden_size=4096,
    hidden_act="silu",
    image_size=336,
    patch_size=14,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
    rms_norm_eps=1e-5,
)

# MiniCPM-V 4.6's tower (openbmb/MiniCPM-V-4.6, ``MiniCPMV4_6VisionConfig``; 4.7 has the same
# tower): SigLIP-So400m/14 blocks (27 of width 1152, 16 heads, MLP 4304) over 448-pixel slices
# (``scale_resolution``; the position table covers 980 pixels = 70 x 70 patches), 2 x 2 merged
# inside the tower after block ``insert_layer_id`` = 6. The so400m block shape is the one
# MiniCPM-V 4.x towers use; no 4.6 config.json could be read here (no downloads) to confirm it.
MINICPMV4_6_VISION: dict[str, Any] = dict(
    model_type="minicpmv4_6_vision",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=980,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    insert_layer_id=6,
)

# Llama 4's tower (meta-llama/Llama-4-Scout-17B-16E-Instruct, ``Llama4VisionConfig``; Maverick's is
# the same): 34 blocks of width 1408 (16 heads of 88), GELU MLP of 5632, 336-pixel tiles of 14-pixel
# patches (24 x 24 and a CLS token), pixel-shuffled by 0.5 into a 4096-wide adapter MLP.
LLAMA4_SCOUT_VISION: dict[str, Any] = dict(
    hidden_size=1408,
    intermediate_size=5632,
    num_hidden_layers=34,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=4096,
    projector_output_dim=4096,
    vision_output_dim=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
