"""Named vision towers and benchmark suites.

Model presets are ``Qwen2VLVisionConfig`` fields. ``qwen2-vl-7b`` is the vision tower of
Qwen2-VL-7B-Instruct (depth 32, width 1280, 16 heads, MLP 5120 = 4 x 1280, output 3584);
``qwen2-vl-2b`` differs only in its output width (1536). ``qwen2-vl-7b-d8`` keeps the 7B block
shapes (so GEMM shapes and per-block costs are the real ones) with depth 8, so that a CPU run stays
short. ``qwen2-vl-tiny`` is for smoke tests; it keeps the 14-pixel patches so that image sizes mean
the same token counts as for the real towers.

Presets of other families are listed in ``PRESET_FAMILIES`` with the family whose vision config
their fields are: ``qwen2.5-vl-7b`` is the vision tower of Qwen2.5-VL-7B-Instruct
(``Qwen2_5_VLVisionConfig``: depth 32, width 1280, 16 heads, gated SiLU MLP 3420, RMSNorm, output
3584, attention in 112-pixel windows except in blocks 7, 15, 23 and 31); ``qwen3-vl-8b`` is
Qwen3-VL-8B-Instruct's; ``clip-vit-l-336-d8`` LLaVA-1.5-7B's CLIP ViT-L/14-336,
``siglip-so400m-d8`` Gemma 3's SigLIP-So400m/14 at 896 pixels (``-384-d8``: at 384),
``internvit-300m-d8`` InternVL2.5-8B's InternViT-300M-448px (``internvit-300m``: its full depth 24),
all with their real block shapes at depth 8 (the ``-d8`` names) so that a CPU run stays short.

Presets listed in ``PRESET_USES`` are timed the way their full model calls the tower
(``ModelUse``): ``llava-1.5-7b`` is LLaVA-1.5-7B's CLIP ViT-L/14-336 at its full depth 24, read at
``vision_feature_layer`` -2 (block 22: block 23 runs neither unpatched nor with IPCV);
``llava-next-7b-d8`` the same tower at depth 8 (read at -2) with LLaVA-NeXT-7B's anyres grid (a
672x672 image: its base crop and 2 x 2 crops, 5 crops one item); ``llava-onevision-7b-d8``
LLaVA-OneVision-7B's SigLIP-So400m/14-384 at depth 8 with its anyres grid up to 6 x 6 crops (a
768x768 image: 5 crops); ``idefics3-8b-d8`` Idefics3-8B's SigLIP-So400m/14-364 tower at depth 8
(a 728x700 image: 2 x 2 sub-images and the global one, the right column's sub-images padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import IPCVConfig

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

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-vl-7b": QWEN2_VL_7B_VISION,
    "qwen2-vl-7b-d8": {**QWEN2_VL_7B_VISION, "depth": 8},
    "qwen2-vl-2b": {**QWEN2_VL_7B_VISION, "hidden_size": 1536},
    "qwen2-vl-tiny": {
        **QWEN2_VL_7B_VISION,
        "depth": 4,
        "embed_dim": 64,
        "num_heads": 4,
        "mlp_ratio": 2,
        "hidden_size": 48,
    },
    "qwen2.5-vl-7b": QWEN2_5_VL_7B_VISION,
    "qwen3-vl-8b": QWEN3_VL_8B_VISION,
    "qwen3-vl-8b-d8": {**QWEN3_VL_8B_VISION, "depth": 8, "deepstack_visual_indexes": [2, 4, 6]},
    "clip-vit-l-336-d8": {**CLIP_VIT_L_336, "num_hidden_layers": 8},
    "siglip-so400m-d8": {**SIGLIP_SO400M_896, "num_hidden_layers": 8},
    "siglip-so400m-384-d8": {**SIGLIP_SO400M_896, "image_size": 384, "num_hidden_layers": 8},
    "internvit-300m-d8": {**INTERNVIT_300M, "num_hidden_layers": 8},
    "internvit-300m": INTERNVIT_300M,
    "llava-1.5-7b": CLIP_VIT_L_336,
    "llava-next-7b-d8": {**CLIP_VIT_L_336, "num_hidden_layers": 8},
    "llava-onevision-7b-d8": {**SIGLIP_SO400M_384_ONEVISION, "num_hidden_layers": 8},
    "idefics3-8b-d8": {**IDEFICS3_8B_VISION, "num_hidden_layers": 8},
}
# Presets that are not Qwen2-VL towers, and their tower kind: a key of
# ``ipcv_kernels.testing.models.TINY_TOWERS`` (the transformers module, config and tower classes).
PRESET_FAMILIES: dict[str, str] = {
    "qwen2.5-vl-7b": "qwen2_5_vl",
    "qwen3-vl-8b": "qwen3_vl",
    "qwen3-vl-8b-d8": "qwen3_vl",
    "clip-vit-l-336-d8": "clip",
    "siglip-so400m-d8": "siglip",
    "siglip-so400m-384-d8": "siglip",
    "internvit-300m-d8": "internvl",
    "internvit-300m": "internvl",
    "llava-1.5-7b": "clip",
    "llava-next-7b-d8": "clip",
    "llava-onevision-7b-d8": "siglip",
    "idefics3-8b-d8": "idefics3",
}


@dataclass(frozen=True)
class ModelUse:
    """How a full multimodal model calls its vision tower: what a benchmark of the tower reproduces.

    model: the full model's name, for reports.
    family: its family's name in the family table (``ipcv_kernels.models.families``), whose
        recommended IPCV setting it takes (the bare tower's family may differ: a LLaVA model's
        tower is a CLIP tower); ``None``: the tower's family.
    feature_layer: its ``vision_feature_layer``, the ``hidden_states`` entry (or entries) it reads
        (LLaVA's -2: the output of block ``depth - 2``). The blocks after the last one read run
        neither unpatched nor with IPCV (the unpatched model would compute them for nothing).
        ``None``: the tower's own output, every block.
    grid_pinpoints: anyres resolutions ``(height, width)`` in pixels (LLaVA-NeXT, OneVision): an
        image is its base crop and the tower-size crops of its best-fitting resolution, all one
        item, counted by ``image_size_to_num_patches`` of ``anyres_module`` as the model counts
        them. ``None``: an image is split into tiles of the tower's size.
    anyres_module: the module under ``transformers.models`` defining that count.
    cases: default cases (``None``: one image at the tower's size).
    """

    model: str
    family: str | None = None
    feature_layer: int | tuple[int, ...] | None = None
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    anyres_module: str = "llava_next.modeling_llava_next"
    cases: tuple[str, ...] | None = None


PRESET_USES: dict[str, ModelUse] = {
    "llava-1.5-7b": ModelUse("LLaVA-1.5-7B", "LLaVA 1.5", feature_layer=-2),
    "llava-next-7b-d8": ModelUse(
        "LLaVA-NeXT-7B", "LLaVA-NeXT", feature_layer=-2, grid_pinpoints=LLAVA_NEXT_PINPOINTS, cases=("672x672",)
    ),
    "llava-onevision-7b-d8": ModelUse(
        "LLaVA-OneVision-7B",
        "LLaVA-OneVision",
        feature_layer=-1,
        grid_pinpoints=ONEVISION_PINPOINTS,
        anyres_module="llava_onevision.modeling_llava_onevision",
        cases=("768x768",),
    ),
    "idefics3-8b-d8": ModelUse("Idefics3-8B", "Idefics3", cases=("728x700",)),
}


@dataclass(frozen=True)
class Suite:
    """Defaults of one benchmark run; every field can be overridden on the command line.

    cases: image sizes in pixels, ``HxW`` (one image), ``HxW*B`` (a batch of ``B`` images) or
    ``HxW@F`` (a video of ``F`` frames); see ``bench.vit.parse_case``.
    """

    model: str
    dtype: str
    cases: tuple[str, ...]
    ipcv: IPCVConfig
    warmup: int
    repeats: int
    description: str


SUITES: dict[str, Suite] = {
    # The CPU target: ratio 0.65, prune layer 2, 2 stabilisation blocks on 2,048 tokens (448x896).
    "cpu": Suite(
        model="qwen2-vl-7b-d8",
        dtype="float32",
        cases=("448x448", "448x896"),
        ipcv=IPCVConfig(prune_layer=2, ratio=0.65, as_layers=2),
        warmup=1,
        repeats=5,
        description="CPU, fp32, 7B block shapes at depth 8",
    ),
    # The GPU target: the paper's Qwen2-VL-7B setting at 1k / 4k / 16k tokens per image, plus the
    # issue's 1024 and 2048 pixel images, a batch and a video.
    "gpu": Suite(
        model="qwen2-vl-7b",
        dtype="bfloat16",
        cases=("448x448", "896x896", "1792x1792", "1024x1024", "2048x2048", "448x448*8", "448x448@16"),
        ipcv=IPCVConfig(prune_layer=3, ratio=0.65, as_layers=7),
        warmup=3,
        repeats=10,
        description="GPU, bf16, full Qwen2-VL-7B vision tower",
    ),
    "smoke": Suite(
        model="qwen2-vl-tiny",
        dtype="float32",
        cases=("112x112", "56x112*2", "56x56@4"),
        ipcv=IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=4),
        warmup=1,
        repeats=2,
        description="tiny tower, code-path check only",
    ),
}
