"""Tiny checkpoints that both vLLM and transformers load: saved seeded random weights, a local
word-level tokenizer and the image processor's settings (no downloads).

``vllm.LLM(load_format="dummy")`` gives every request the same output, so the vLLM tests and the
benchmark save real (seeded random) weights instead: vLLM and transformers then load the same
weights, and their vision embeddings can be compared. The vocabulary is ``w3 .. w119`` plus the
Qwen2-VL special tokens at the ids of ``ipcv_kernels.testing.models.TINY_SPECIAL_TOKENS``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._validation import check_int
from ..families import ModelUse, build_model
from ..testing.models import (
    GLM4V_SPECIAL_TOKENS,
    GLM4V_VISION,
    INTERNVL_IMAGE_TOKEN,
    INTERNVL_TOKENS_PER_TILE,
    TINY_SPECIAL_TOKENS,
    TINY_TEXT,
    TINY_VISION,
    internvl_tiles,
    minicpmv_pixels,
    sample_pixels,
)
from ..testing.processors import (
    INTERNVL_CHAT_SPECIAL_TOKENS,
    INTERNVL_MAX_TILES,
    INTERNVL_NAMED_TOKENS,
    INTERNVL_SPECIAL_TOKENS,
    INTERNVL_TILE,
    build_tokenizer,
)

# vLLM's CPU attention backend takes head sizes of 32 and more: 2 heads of 32 (TINY_TEXT's 12 is
# too small); mrope sections add up to half the head size.
VLLM_TEXT = {
    **TINY_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
}
# The engine settings of the vLLM tests and benchmark (fp32, eager, no prefix
# caching, no processor cache, so every image is processed and encoded anew).
ENGINE: dict[str, Any] = dict(
    dtype="float32",
    enforce_eager=True,
    enable_prefix_caching=False,
    mm_processor_cache_gb=0,
    max_model_len=512,
    max_num_seqs=4,
    seed=0,
    limit_mm_per_prompt={"image": 4, "video": 1},
)
# The Qwen checkpoints' chat template (what ``vllm serve`` applies to chat requests): each message's
# images as the Qwen placeholder, its text as is.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
)
# The image processor's resize bounds (pixels): small images stay small (factor 4 = patch 2 x merge 2).
MIN_PIXELS, MAX_PIXELS = 4 * 4, 64 * 64


# Qwen2.5-VL: windows of 2 x 2 merge units, full attention in blocks 2 and 5.
QWEN2_5_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=VLLM_TEXT["hidden_size"],
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=8,
    fullatt_block_indexes=[2, 5],
)


# Qwen3-VL: a Qwen3 decoder (head size 32, interleaved mrope) and a tower with position embeddings
# on an 8 x 8 grid and DeepStack taps after blocks 1, 3 and 4 (inside and after the pruned stretch
# of the tests' prune layer 2).
QWEN3_TEXT = {
    **VLLM_TEXT,
    "head_dim": 32,
    "rope_parameters": {**VLLM_TEXT["rope_parameters"], "mrope_interleaved": True},
}
QWEN3_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=VLLM_TEXT["hidden_size"],
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=[1, 3, 4],
)
# Qwen3.5: Qwen3-VL's tower without DeepStack; its decoder's full-attention layers (head size 32,
# rotary over the whole head). The checkpoint has no Gated DeltaNet layer: vLLM 0.32's CPU kernel
# for them takes bf16 only, and these tests run fp32 (IPCV never touches the decoder).
QWEN3_5_TEXT = {
    **QWEN3_TEXT,
    "rope_parameters": {**QWEN3_TEXT["rope_parameters"], "partial_rotary_factor": 1.0},
    "layer_types": ["full_attention"] * VLLM_TEXT["num_hidden_layers"],
}
QWEN3_5_VISION = {key: value for key, value in QWEN3_VISION.items() if key != "deepstack_visual_indexes"}
# GLM-4.1V: a GLM-4 decoder of head size 32 (interleaved rotary over half of it: mrope sections
# add up to a quarter of the head size) and the family table's tiny tower.
GLM4V_TEXT = {
    **VLLM_TEXT,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [2, 3, 3],
        "partial_rotary_factor": 0.5,
    },
}
# GLM's special tokens at the ids of ``ipcv_kernels.testing.models.GLM4V_SPECIAL_TOKENS`` (what
# its processor and vLLM's look up by name).
GLM4V_TOKENS = {
    "<|image|>": GLM4V_SPECIAL_TOKENS["image_token_id"],
    "<|video|>": GLM4V_SPECIAL_TOKENS["video_token_id"],
    "<|begin_of_image|>": GLM4V_SPECIAL_TOKENS["image_start_token_id"],
    "<|end_of_image|>": GLM4V_SPECIAL_TOKENS["image_end_token_id"],
    "<|begin_of_video|>": GLM4V_SPECIAL_TOKENS["video_start_token_id"],
    "<|end_of_video|>": GLM4V_SPECIAL_TOKENS["video_end_token_id"],
}
# The table's tiny tower with weights drawn 5x wider than GLM's initialisation (0.02): at that scale
# the tiny tower's features are ~1e-3 (its merger's gated MLP multiplies small terms), below what
# absolute fp32 bounds resolve.
GLM4V_VLLM_VISION = {**GLM4V_VISION, "initializer_range": 0.1}
GLM4V_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|begin_of_image|><|image|><|end_of_image|>"
)
# family -> (transformers class prefix, text config, vision config, the vision field holding the
# merger's output width: always the language model's ``hidden_size``)
CHECKPOINTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "qwen2_vl": ("Qwen2VL", VLLM_TEXT, TINY_VISION, "hidden_size"),
    "qwen2_5_vl": ("Qwen2_5_VL", VLLM_TEXT, QWEN2_5_VISION, "out_hidden_size"),
    "qwen3_vl": ("Qwen3VL", QWEN3_TEXT, QWEN3_VISION, "out_hidden_size"),
    "qwen3_5": ("Qwen3_5", QWEN3_5_TEXT, QWEN3_5_VISION, "out_hidden_size"),
    "glm4v": ("Glm4v", GLM4V_TEXT, GLM4V_VLLM_VISION, "out_hidden_size"),
}


# MiniCPM-V 4.6: the family table's tiny model (its tower merges 2 x 2 after block 0, so IPCV
# applies from block 2 on) with Qwen3.5's full-attention decoder of head size 32 (``QWEN3_5_TEXT``:
# vLLM 0.32's CPU Gated DeltaNet kernel takes bf16 only); its tokens at the ids 120 .. 127, named
# on the tokenizer as transformers' MiniCPMV4_6Processor reads them.
MINICPMV_TOKENS = {
    "<|image_pad|>": TINY_SPECIAL_TOKENS["image_token_id"],
    "<|video_pad|>": TINY_SPECIAL_TOKENS["video_token_id"],
    "<image>": 122,
    "</image>": 123,
    "<slice>": 124,
    "</slice>": 125,
    "<image_id>": 126,
    "</image_id>": 127,
}
MINICPMV_NAMED_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
# The tiny image processor: 16-pixel source slices (8 x 8 patches of 2, 4 tokens) and no crops (at
# most 1 slice), so that a request's image is one unpadded slice and the tower's first block sees
# exactly its patches (bench-vllm's check); images of several slices, of different sizes, are
# given to the encoder directly by the tests (``minicpmv_encoder_inputs``).
MINICPMV_SCALE_RESOLUTION, MINICPMV_MAX_SLICES = 16, 1
MINICPMV_CHECKPOINT_SCALE_RESOLUTION = 448


# InternVL: vLLM's CPU attention needs a decoder head size of 32.
INTERNVL_TEXT_OVERRIDES = {
    key: VLLM_TEXT[key]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
}
# LLaVA 1.5 / Gemma 3 / PaliGemma: the family table's tiny models (CLIP / SigLIP towers over 32 x 32
# images of 4 x 4 patches) with decoders of head size 32 for vLLM's CPU attention.
CLIP_FAMILY_TEXT_OVERRIDES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
# PaliGemma's processor adds 1,152 tokens (<loc....>, <seg...>) after the tiny vocabulary's 263.
PALIGEMMA_VOCAB = 1536
CLIP_FAMILY_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "llava": CLIP_FAMILY_TEXT_OVERRIDES,
    "llava_next": CLIP_FAMILY_TEXT_OVERRIDES,
    "llava_onevision": CLIP_FAMILY_TEXT_OVERRIDES,
    "idefics3": CLIP_FAMILY_TEXT_OVERRIDES,
    "smolvlm": CLIP_FAMILY_TEXT_OVERRIDES,
    "gemma3": {**CLIP_FAMILY_TEXT_OVERRIDES, "head_dim": 32},
    "paligemma": {**CLIP_FAMILY_TEXT_OVERRIDES, "head_dim": 32, "vocab_size": PALIGEMMA_VOCAB},
    "mistral3": {**CLIP_FAMILY_TEXT_OVERRIDES, "head_dim": 32},
}
# The newline tokens vLLM's Gemma 3 and PaliGemma processors look up in the vocabulary (Gemma 3
# merges the "\n\n" around each image with neighbouring newlines; PaliGemma ends its prompts with
# "\n"): ids after the tiny vocabulary's.
NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
# Llama 4: the family table's tiny model (16-pixel tiles of 4 x 4 patches, CLS last, 6 layers) with a
# decoder vLLM's CPU attention takes (head size 32; chunked attention over chunks of 128 tokens, the
# multiple of vLLM's KV-cache block of 128 that its chunked-local attention requires, the tiny
# model's 8 is not one; its MoE kept: 2 experts, top 1), saved with
# transformers' own Llama4Processor and image processor (torchvision, which the vLLM environment
# has): up to LLAMA4_MAX_TILES tiles per image and a global tile when there are several.
LLAMA4_TEXT_OVERRIDES = {
    **CLIP_FAMILY_TEXT_OVERRIDES,
    "intermediate_size_mlp": 128,
    "head_dim": 32,
    "attention_chunk_size": 128,
    # Wider than the default 0.02: at that scale the tiny decoder gives the same tokens whatever the image.
    "initializer_range": 0.1,
}
LLAMA4_MAX_TILES = 4
# Kimi-K2.5: the family table's tiny model with a decoder vLLM's CPU MLA kernels take (they fix the
# latent cache at kv_lora_rank 512 + qk_rope_head_dim 64 = 576 wide) and dense layers only (vLLM 0.32
# has no CPU MoE backend for fp32: "No Unquantized MoE backend supports the deployment
# configuration"), its media tokens at the ids of the tiny model's special tokens (vLLM looks
# <|media_pad|> up by name), and what vLLM's own image processor (``KimiK25FusedVisionProcessor``)
# reads from ``processor_config.json``.
KIMI_K25_TEXT = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "first_k_dense_replace": 2}
KIMI_K25_TOKENS = {
    "<|media_pad|>": TINY_SPECIAL_TOKENS["image_token_id"],
    "<|media_begin|>": TINY_SPECIAL_TOKENS["vision_start_token_id"],
    "<|media_end|>": TINY_SPECIAL_TOKENS["vision_end_token_id"],
    "<|media_content|>": TINY_SPECIAL_TOKENS["vision_end_token_id"] + 1,
}
# One image's placeholder in a Kimi-K2.5 prompt (vLLM's ``get_placeholder_str``).
KIMI_K25_IMAGE = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
KIMI_K25_MEAN_STD = (0.5, 0.5, 0.5)
# Engine settings some families need beyond ``ENGINE`` (``engine_settings``). Kimi-K2.5: fp32 MLA
# runs on the reference CPU_MLA backend (vLLM picks AMX_MLA on CPUs with AMX, which takes 16-bit and
# 8-bit weights only); pixels normalised by the processor, not in the tower (vLLM's default for this
# model, ``mm_device_do_normalize``, normalises inside ``patch_embed``: the tests hand the tower
# the pixels transformers gets); media go in as ``vision_chunk`` items (the model's one modality).
ENGINE_OPTIONS: dict[str, dict[str, Any]] = {
    "kimi_k25": dict(
        attention_config={"backend": "CPU_MLA"},
        mm_device_do_normalize=False,
        limit_mm_per_prompt={"vision_chunk": 4},
    ),
}
# The ``multi_modal_data`` key of images where it is not ``"image"``: Kimi-K2.5 takes images and video
# clips as one modality.
IMAGE_MODALITY = {"kimi_k25": "vision_chunk"}
FAMILIES = (
    *CHECKPOINTS,
    "internvl",
    "internvl_chat",
    *CLIP_FAMILY_CHECKPOINTS,
    "gemma4",
    "llama4",
    "minicpmv",
    "kimi_k25",
)


def engine_settings(family: str, **overrides: Any) -> dict[str, Any]:
    """``vllm.LLM``'s settings for a ``family`` checkpoint: ``ENGINE``, the family's
    ``ENGINE_OPTIONS``, then ``overrides`` (a limit of images per prompt is given as the family's
    media modality's: ``limit_mm_per_prompt={"image": n}`` becomes ``{"vision_chunk": n}`` for
    Kimi-K2.5)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    settings = {**ENGINE, **ENGINE_OPTIONS.get(family, {})}
    limits = overrides.pop("limit_mm_per_prompt", None)
    if limits is not None:
        modality = image_modality(family)
        settings["limit_mm_per_prompt"] = {modality if key == "image" else key: n for key, n in limits.items()}
    return {**settings, **overrides}


def image_modality(family: str) -> str:
    """The ``multi_modal_data`` key a ``family`` model takes images under (``IMAGE_MODALITY``)."""
    return IMAGE_MODALITY.get(family, "image")


def image_request(family: str, prompt: str, images: Any, uuid: str) -> dict[str, Any]:
    """A ``generate`` request of ``prompt`` with ``images`` (a PIL image or a list) for a
    ``family`` model, under a new ``uuid`` per image (vLLM keys its encoder cache by it)."""
    images = images if isinstance(images, list) else [images]
    modality = image_modality(family)
    data = [{"type": "image", "image": image} for image in images] if modality == "vision_chunk" else images
    uuids = [uuid if len(images) == 1 else f"{uuid}-{i}" for i in range(len(images))]
    return {"prompt": prompt, "multi_modal_data": {modality: data}, "multi_modal_uuids": {modality: uuids}}


@dataclass(frozen=True)
class Sizing:
    """What ``build_checkpoint`` changes in a family's tiny checkpoint besides the Qwen families'
    fields: vision-config fields (a preset's tower shape), text-config fields, and the full model's
    use of the tower (``ModelUse``: anyres resolutions), if any."""

    vision: dict[str, Any]
    text: dict[str, Any]
    use: ModelUse | None


def _side(value: int | Sequence[int]) -> int:
    """A square size (image, tile or patch side) given as an int or ``[height, width]``."""
    return value if isinstance(value, int) else int(value[0])


def size_to_tower(family: str, config: Any, processor: Any, use: ModelUse | None = None) -> Any:
    """Size ``family``'s tiny processor (and the model ``config``'s fields that count image tokens)
    to ``config``'s vision tower: its image, tile or crop side ``S``, patch side ``p``, tokens per
    tile; LLaVA-NeXT's and OneVision's anyres resolutions from ``use`` (else the tiny model's 1 x 2,
    2 x 1 and 2 x 2 crops, at ``S``). Returns the processor (``config`` is changed in place).

    The image processors keep the real checkpoints' conventions: LLaVA's shortest edge to ``S`` and a
    centre crop; Idefics3's images to at most ``4 S`` on the longer side, split into ``S``
    sub-images; Gemma 4's budget of ``default_output_length`` soft tokens; Pixtral's longer side to
    at most ``S``, in units of 2 x 2 merged patches; InternVL's ``S`` tiles (at most
    ``INTERNVL_MAX_TILES`` and a thumbnail); MiniCPM-V's slicing (448-pixel source slices, up to 9
    crops, in the tower's patches).

    Raises:
        ValueError: ``family`` is not one of ``SIZED_FAMILIES``'s non-Qwen families.
    """
    vision = config.vision_config
    patch = _side(vision.patch_size)
    # Gemma 4's tower has no image size (a budget of patches instead): sized by its own fields below.
    side = _side(vision.image_size) if family != "gemma4" else patch
    tokens = (side // patch) ** 2  # patches of one image, tile, crop or sub-image
    square = {"height": side, "width": side}
    pinpoints = (
        [list(p) for p in use.grid_pinpoints]
        if use is not None and use.grid_pinpoints is not None
        else [[side * rows, side * cols] for rows, cols in ((1, 2), (2, 1), (2, 2))]
    )
    if family in ("llava", "llava_next"):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        processor.patch_size = patch
        sizes = dict(size={"shortest_edge": side}, crop_size=square)
        if family == "llava":
            config.image_seq_length = tokens
            processor.image_processor = CLIPImageProcessorPil(**sizes)
        else:
            config.image_grid_pinpoints = pinpoints
            processor.image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints)
    elif family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        config.image_grid_pinpoints = pinpoints
        processor.image_processor = LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=pinpoints)
        processor.num_image_tokens = tokens  # SigLIP: no CLS
    elif family in ("idefics3", "smolvlm"):
        processor.image_processor = type(processor.image_processor)(
            size={"longest_edge": 4 * side}, max_image_size={"longest_edge": side}
        )
        processor.image_seq_len = tokens // config.scale_factor**2  # pixel shuffle
    elif family == "mistral3":
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        unit = patch * config.spatial_merge_size
        processor.image_processor = PixtralImageProcessorPil(
            size={"longest_edge": side}, patch_size={"height": unit, "width": unit}
        )
        processor.patch_size = patch
    elif family == "gemma4":
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        budget = vision.default_output_length
        processor.image_processor = Gemma4ImageProcessorPil(
            patch_size=patch, pooling_kernel_size=vision.pooling_kernel_size, max_soft_tokens=budget
        )
        processor.image_seq_length = budget
    elif family == "minicpmv":
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
        from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

        # The checkpoint's slicing (openbmb/MiniCPM-V-4.6's preprocessor): 448-pixel source
        # slices, up to 9 crops; the tower's image size is its position table's, not a slice's.
        slicing = dict(patch_size=patch, scale_resolution=MINICPMV_CHECKPOINT_SCALE_RESOLUTION)
        processor.image_processor = MiniCPMV4_6ImageProcessorPil(**slicing, max_slice_nums=9)
        processor.video_processor = MiniCPMV4_6VideoProcessor(**slicing)
    elif family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        config.image_seq_length = int(tokens * config.downsample_ratio**2)  # pixel shuffle
        processor.image_processor = GotOcr2ImageProcessorPil(
            size=square, crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES
        )
        processor.image_seq_length = config.image_seq_length
    elif family == "llama4":
        from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

        processor.image_processor = Llama4ImageProcessor(size=square, max_patches=LLAMA4_MAX_TILES)
        processor.patch_size = patch  # tokens per tile: (S / p)^2 over the pixel shuffle's 4
    else:
        raise ValueError(f"family: no processor sizing for {family!r}; one of {SIZED_FAMILIES}")
    return processor


# The families whose tiny checkpoint takes another tower shape (``build_checkpoint``'s ``vision``
# and ``preset``): the Qwen families' processors take the patch sizes; the others' are sized by
# ``size_to_tower``.
SIZED_FAMILIES = (
    *CHECKPOINTS,
    "internvl",
    "llava",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
    "mistral3",
    "gemma4",
    "llama4",
    "minicpmv",
    "kimi_k25",
)


def build_checkpoint(
    path: str | Path,
    family: str = "qwen2_vl",
    *,
    seed: int = 0,
    vision: Mapping[str, Any] | None = None,
    text: Mapping[str, Any] | None = None,
    max_pixels: int = MAX_PIXELS,
    preset: str | None = None,
) -> Path:
    """Save a tiny ``family`` model (one of ``FAMILIES``: fp32 seeded random weights, tokenizer,
    image (and Qwen3-VL / InternVL video) processor settings, a chat template for the Qwen and
    CLIP / SigLIP families) under ``path``; return the directory.

    Args:
        vision: vision-config fields replacing the tiny tower's (e.g. the 7B tower's widths at a
            reduced depth for the vLLM benchmark); the merger's output width (``hidden_size`` /
            ``out_hidden_size``) always stays the language model's. Every family with presets
            (``SIZED_FAMILIES``): the image processor is then sized to the tower (its image,
            tile or crop size, patch size, tokens per tile; ``size_processor``).
        text: language-model config fields replacing the tiny decoder's (e.g. a larger
            ``max_position_embeddings`` for prompts with large images). Not ``internvl_chat``.
        max_pixels: the image processor's upper bound on an image's pixels (larger images are
            shrunk to it); the default keeps the tests' images small. Qwen families only.
        preset: a preset of the family's row (``ipcv_kernels.families.presets``): the tower gets
            the preset's shape (``vision`` applied on top, e.g. a reduced depth for a test) and the
            processor the full model's use of it (LLaVA-NeXT's and OneVision's anyres
            resolutions, ``ModelUse.grid_pinpoints``). ``SIZED_FAMILIES`` only.

    Loadable by ``vllm.LLM(model=path)`` and by transformers' ``from_pretrained(path)``.
    ``internvl`` is transformers' native format (``InternVLForConditionalGeneration``; vLLM builds
    its ``InternS1ForConditionalGeneration`` for it), the tiny model of
    ``ipcv_kernels.families.build_model`` with a decoder vLLM's CPU attention takes.
    ``internvl_chat`` holds the same weights, for the same ``seed``, in InternVL's own format
    (``InternVLChatModel``, remote-code configuration: load with ``trust_remote_code=True``);
    vLLM loads it, transformers cannot (no modelling code), so tests compare it with the
    ``internvl`` checkpoint of the same seed.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path)
    for name, fields in (("vision", vision), ("text", text)):
        if fields is not None and not isinstance(fields, Mapping):
            raise TypeError(f"{name} must be a mapping of config fields, got {type(fields).__name__}")
    check_int("max_pixels", max_pixels, low=MIN_PIXELS)
    use = None
    if preset is not None:
        from ..families import presets

        row, entry = presets().get(preset, (None, None))
        if row is None or row.id != family:
            names = sorted(name for name, (r, _) in presets().items() if r.id == family)
            raise ValueError(f"preset must be one of {family}'s presets {names}, got {preset!r}")
        vision, use = {**entry.vision, **(vision or {})}, entry.use
    if (vision or preset is not None) and family not in SIZED_FAMILIES:
        raise ValueError(f"vision and preset apply to the families with presets {SIZED_FAMILIES}, not to {family}")
    if family not in CHECKPOINTS:
        if max_pixels != MAX_PIXELS and family != "kimi_k25":
            raise ValueError(f"max_pixels applies to the Qwen families and kimi_k25 only, not to {family}")
        if text and family == "internvl_chat":
            raise ValueError("text does not apply to internvl_chat (its configuration is written by hand)")
        sizing = Sizing(dict(vision or {}), dict(text or {}), use)
        if family in CLIP_FAMILY_CHECKPOINTS:
            return _build_clip_family(path, family, seed, sizing)
        if family == "gemma4":
            return _build_gemma4(path, seed, sizing)
        if family == "llama4":
            return _build_llama4(path, seed, sizing)
        if family == "minicpmv":
            return _build_minicpmv(path, seed, sizing)
        if family == "kimi_k25":
            return _build_kimi_k25(path, seed, sizing, max_pixels)
        return _build_internvl(path, seed, sizing) if family == "internvl" else _build_internvl_chat(path, seed)
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    prefix, base_text, base_vision, output = CHECKPOINTS[family]
    text = {**base_text, **(text or {})}
    vision = {**base_vision, **(vision or {}), output: text["hidden_size"]}
    special = GLM4V_SPECIAL_TOKENS if family == "glm4v" else TINY_SPECIAL_TOKENS
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, **special)
    config.architectures = [f"{prefix}ForConditionalGeneration"]
    torch.manual_seed(seed)
    getattr(transformers, f"{prefix}ForConditionalGeneration")(config).to(torch.float32).eval().save_pretrained(path)
    sizes = dict(
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"],
    )
    if family == "glm4v":
        return _save_glm4v_processor(path, sizes, max_pixels)
    Qwen2VLImageProcessorPil(**sizes, min_pixels=MIN_PIXELS, max_pixels=max_pixels).save_pretrained(path)
    if family in ("qwen3_vl", "qwen3_5"):  # their processors also load a video processor (Qwen2-VL's: defaults)
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        Qwen3VLVideoProcessor(**sizes, size={"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}).save_pretrained(
            path
        )
    build_tokenizer().save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return path


def _save_glm4v_processor(path: Path, sizes: dict[str, int], max_pixels: int) -> Path:
    """GLM-4.1V's processor files beside a saved model: its image and video processors (the
    patch sizes, images kept small), a word-level tokenizer with GLM's special tokens, the chat
    template."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}
    Glm4vImageProcessorPil(**sizes, size=size).save_pretrained(path)
    Glm4vVideoProcessor(**sizes, size=size).save_pretrained(path)
    build_tokenizer(GLM4V_TOKENS).save_pretrained(path)
    (path / "chat_template.jinja").write_text(GLM4V_CHAT_TEMPLATE)
    return path


def _build_clip_family(path: Path, family: str, seed: int, sizing: Sizing) -> Path:
    """The family table's tiny ``family`` model (LLaVA 1.5, LLaVA-NeXT, Gemma 3, PaliGemma) and processor,
    with the decoder of ``CLIP_FAMILY_CHECKPOINTS`` and an output layer of its own, saved as vLLM
    loads them.

    What vLLM needs beyond transformers: the tower's weights under the Hub's names,
    ``vision_tower.vision_model.*`` (transformers 5 saves ``vision_tower.embeddings.*``, ...);
    Gemma 3's and PaliGemma's newline tokens in the vocabulary (``NEWLINES``); PaliGemma's
    ``image_seq_length`` on the image processor and a vocabulary covering the tokens its
    processor adds. The processor's settings (LLaVA's ``patch_size``,
    ``vision_feature_select_strategy``, ``num_additional_image_tokens``; Gemma 3's
    ``image_token`` / ``boi_token`` / ``eoi_token`` and ``image_seq_length``) come from
    ``ipcv_kernels.testing.processors.clip_family_processor``. With ``sizing``'s vision fields, the
    tower takes them and the processor is sized to it (``size_to_tower``).
    """
    import transformers
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken

    from ..families import family as family_row
    from ..testing.models import finish, jitter

    tiny = family_row(family).tiny_model
    text = {**CLIP_FAMILY_CHECKPOINTS[family], **sizing.text}
    fields = tiny.fields(text)
    fields["vision_config"] = {**fields["vision_config"], **sizing.vision}
    if family == "paligemma":  # the projector maps the tower to the decoder's width
        fields["projection_dim"] = text["hidden_size"]
        fields["vision_config"] = {**fields["vision_config"], "projection_dim": text["hidden_size"]}
    config = getattr(transformers, tiny.config_class)(**fields)
    config.architectures = [tiny.model_class]
    # Untied output layer: tied, a tiny decoder tends to repeat the prompt whatever the image.
    config.tie_word_embeddings = False
    config.get_text_config().tie_word_embeddings = False
    if family == "mistral3":
        from ..testing.processors import mistral3_hf_processor

        processor = mistral3_hf_processor()
    else:
        processor = tiny.processor()
    if sizing.vision:
        processor = size_to_tower(family, config, processor, sizing.use)
    torch.manual_seed(seed)
    model = getattr(transformers, tiny.model_class)(config)
    jitter(model, seed)
    finish(model, "sdpa", torch.float32).save_pretrained(path)

    if family == "mistral3":  # vLLM maps transformers' names of Mistral 3 itself (its hf_to_vllm_mapper)
        processor.save_pretrained(path)
        return path
    weights_file = path / "model.safetensors"
    weights = load_file(str(weights_file))
    prefix = "vision_tower."
    renamed = {
        (
            f"{prefix}vision_model.{name[len(prefix) :]}"
            if name.startswith(prefix) and not name.startswith(f"{prefix}vision_model.")
            else name
        ): tensor
        for name, tensor in weights.items()
    }
    save_file(renamed, str(weights_file), metadata={"format": "pt"})

    if family in ("gemma3", "paligemma"):
        processor.tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in NEWLINES])
    if family == "paligemma":
        processor.image_processor.image_seq_length = processor.image_seq_length
    if len(processor.tokenizer) > config.get_text_config().vocab_size:
        raise ValueError(f"the {family} tokenizer's {len(processor.tokenizer)} tokens exceed the vocabulary")
    processor.save_pretrained(path)
    if type(processor).__name__ == "UncheckedVideoProcessor":
        # The tiny processor is a subclass (``unchecked_video_processor``) whose save writes its own
        # class name and none of the processor's fields: write what vLLM's AutoProcessor reads.
        import inspect
        import json

        processor_class = type(processor).__mro__[1]
        config_file = path / "processor_config.json"
        saved = json.loads(config_file.read_text())
        saved["processor_class"] = processor_class.__name__
        for name in inspect.signature(processor_class.__init__).parameters:
            value = getattr(processor, name, None)
            if name not in saved and name != "chat_template" and isinstance(value, (str, int, float, bool)):
                saved[name] = value
        config_file.write_text(json.dumps(saved, indent=2))
    return path


def _build_gemma4(path: Path, seed: int, sizing: Sizing) -> Path:
    """The family table's tiny Gemma 4 (4-pixel patches pooled 2 x 2, a decoder of head size 32)
    with an output layer of its own, and its processor as vLLM loads it: transformers'
    ``Gemma4Processor`` with the tiny tokenizer and image processor
    (``ipcv_kernels.testing.processors.gemma4_processor``: a 70-soft-token budget, 280 patch rows
    per image), plus the audio feature extractor and video processor its ``from_pretrained``
    expects (defaults; the tests send images only). With ``sizing``'s vision fields, the tower takes
    them and the processor is sized to it (``size_to_tower``)."""
    import transformers
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    from ..families import family as family_row
    from ..testing.models import finish, jitter

    tiny = family_row("gemma4").tiny_model
    fields = tiny.fields(sizing.text)
    fields["vision_config"] = {**fields["vision_config"], **sizing.vision}
    config = transformers.Gemma4Config(**fields)
    config.architectures = [tiny.model_class]
    # Untied output layer: tied, a tiny decoder tends to repeat the prompt whatever the image.
    config.tie_word_embeddings = False
    config.get_text_config().tie_word_embeddings = False
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(config)
    jitter(model, seed)
    finish(model, "sdpa", torch.float32).save_pretrained(path)
    tiny_processor = tiny.processor()
    if sizing.vision:
        tiny_processor = size_to_tower("gemma4", config, tiny_processor, sizing.use)
    vision = config.vision_config
    processor = transformers.Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=tiny_processor.image_processor,
        tokenizer=tiny_processor.tokenizer,
        video_processor=Gemma4VideoProcessor(
            patch_size=vision.patch_size, pooling_kernel_size=vision.pooling_kernel_size, max_soft_tokens=70
        ),
        chat_template=tiny_processor.chat_template,
        image_seq_length=tiny_processor.image_seq_length,
    )
    processor.save_pretrained(path)
    return path


def _build_llama4(path: Path, seed: int, sizing: Sizing) -> Path:
    """The family table's tiny Llama 4 with the decoder of ``LLAMA4_TEXT_OVERRIDES`` and an output
    layer of its own, saved as transformers saves it (vLLM reads those names: ``vision_model.*``,
    ``multi_modal_projector.*``, ``language_model.*``, the experts' fused ``gate_up_proj`` /
    ``down_proj``), and transformers' ``Llama4Processor``: the tiny tokenizer with Llama 4's
    special tokens (``ipcv_kernels.testing.processors.TinyLlama4Processor``), ``Llama4ImageProcessor``
    sized to the tower (``size_to_tower``). With ``sizing``'s vision fields, the tower takes them."""
    import transformers
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    from ..families import family as family_row
    from ..testing.models import finish, jitter

    tiny = family_row("llama4").tiny_model
    fields = tiny.fields({**LLAMA4_TEXT_OVERRIDES, **sizing.text})
    fields["vision_config"] = {**fields["vision_config"], **sizing.vision}
    config = transformers.Llama4Config(**fields)
    config.architectures = [tiny.model_class]
    # Untied output layer: tied, a tiny decoder tends to repeat the prompt whatever the image.
    config.tie_word_embeddings = False
    config.get_text_config().tie_word_embeddings = False
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(config)
    jitter(model, seed)
    finish(model, "sdpa", torch.float32).save_pretrained(path)
    tiny_processor = tiny.processor()
    processor = transformers.Llama4Processor(
        image_processor=Llama4ImageProcessor(),  # sized below
        tokenizer=tiny_processor.tokenizer,
        chat_template=tiny_processor.chat_template,
    )
    size_to_tower("llama4", config, processor, sizing.use)
    if len(processor.tokenizer) > config.get_text_config().vocab_size:
        raise ValueError(f"the llama4 tokenizer's {len(processor.tokenizer)} tokens exceed the vocabulary")
    processor.save_pretrained(path)
    return path


def _build_minicpmv(path: Path, seed: int, sizing: Sizing) -> Path:
    """The family table's tiny MiniCPM-V 4.6 (``QWEN3_5_TEXT``'s decoder, its own output layer) and
    transformers' own ``MiniCPMV4_6Processor`` as vLLM loads it: the tiny image processor
    (``MINICPMV_SCALE_RESOLUTION``, ``MINICPMV_MAX_SLICES``), a video processor of the same patch
    size (the processor requires one; the tests send images), a tokenizer with the named tokens of
    ``MINICPMV_NAMED_TOKENS``. With ``sizing``'s vision fields the tower takes them (its
    ``insert_layer_id`` too: the model config's, which the tower config follows) and the processor
    is sized to it (``size_to_tower``). vLLM maps transformers' weight names itself."""
    import transformers
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    from ..families import family as family_row
    from ..testing.models import finish, jitter

    tiny = family_row("minicpmv").tiny_model
    fields = tiny.fields({**QWEN3_5_TEXT, **sizing.text})
    fields["vision_config"] = {**fields["vision_config"], **sizing.vision}
    fields["insert_layer_id"] = fields["vision_config"].get("insert_layer_id", fields["insert_layer_id"])
    config = transformers.MiniCPMV4_6Config(**fields)
    config.architectures = [tiny.model_class]
    # Untied output layer: tied, a tiny decoder tends to repeat the prompt whatever the image.
    config.tie_word_embeddings = False
    config.get_text_config().tie_word_embeddings = False
    torch.manual_seed(seed)
    model = transformers.MiniCPMV4_6ForConditionalGeneration(config)
    jitter(model, seed)
    finish(model, "sdpa", torch.float32).save_pretrained(path)
    patch = config.vision_config.patch_size
    processor = transformers.MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessorPil(
            patch_size=patch, scale_resolution=MINICPMV_SCALE_RESOLUTION, max_slice_nums=MINICPMV_MAX_SLICES
        ),
        video_processor=MiniCPMV4_6VideoProcessor(
            patch_size=patch, scale_resolution=MINICPMV_SCALE_RESOLUTION, max_slice_nums=MINICPMV_MAX_SLICES
        ),
        tokenizer=build_tokenizer(MINICPMV_TOKENS, MINICPMV_NAMED_TOKENS),
        chat_template=QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"),
    )
    if sizing.vision:
        processor = size_to_tower("minicpmv", config, processor, sizing.use)
    processor.save_pretrained(path)
    return path


# transformers' Kimi-K2.5 weight names -> the Hub's (what vLLM loads, and transformers converts back
# on load), applied in order; the attention's q / k / v are fused separately (``kimi_k25_state_dict``).
_KIMI_K25_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.patch_embed.pos_emb.position_embeddings", "vision_tower.patch_embed.pos_emb.weight"),
    ("model.vision_tower.patch_embed.", "vision_tower.patch_embed."),
    ("model.vision_tower.final_layernorm.", "vision_tower.encoder.final_layernorm."),
    ("model.vision_tower.layers.", "vision_tower.encoder.blocks."),
    (".norm1.", ".norm0."),
    (".norm2.", ".norm1."),
    (".mlp.fc1.", ".mlp.fc0."),
    (".mlp.fc2.", ".mlp.fc1."),
    (".attn.proj.", ".wo."),
    ("model.mm_projector.in_proj.", "mm_projector.proj.0."),
    ("model.mm_projector.out_proj.", "mm_projector.proj.2."),
    ("model.mm_projector.", "mm_projector."),
)


def _interleave_rotary_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """A q / k projection's output rows (weight or bias) from transformers' ``rotate_half`` order
    (each head's features ``0, 2, 4, ..`` then ``1, 3, 5, ..``) back to the Hub's interleaved
    order: the inverse of transformers' ``PermuteForRope``."""
    rows = tensor.shape[0]
    half = rows // heads // 2
    return tensor.reshape(heads, 2, half, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def kimi_k25_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """A transformers ``Kimi_K25ForConditionalGeneration``'s weights under the Hub's names: the
    tower's ``q_proj`` / ``k_proj`` / ``v_proj`` as one ``wqkv`` (rows ``[q; k; v]``, q and k in the
    interleaved rotary order), the decoder's fused experts as one module per expert."""
    heads = model.config.vision_config.num_attention_heads
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for old, new in _KIMI_K25_NAMES:
            name = name.replace(old, new)
        weights[name] = tensor.detach().clone().contiguous()
    for name in [n for n in weights if ".attn.q_proj." in n]:
        q, k, v = (weights.pop(name.replace(".q_proj.", f".{x}_proj.")) for x in "qkv")
        fused = torch.cat([_interleave_rotary_rows(q, heads), _interleave_rotary_rows(k, heads), v])
        weights[name.replace(".attn.q_proj.", ".wqkv.")] = fused.contiguous()
    for name in [n for n in weights if n.endswith(".mlp.experts.gate_up_proj")]:
        gate_up, down = weights.pop(name), weights.pop(name.replace("gate_up_proj", "down_proj"))
        prefix = name[: -len("gate_up_proj")]
        for expert, (gate, up) in enumerate(zip(*gate_up.chunk(2, dim=1), strict=True)):
            weights[f"{prefix}{expert}.gate_proj.weight"] = gate.contiguous()
            weights[f"{prefix}{expert}.up_proj.weight"] = up.contiguous()
            weights[f"{prefix}{expert}.down_proj.weight"] = down[expert].contiguous()
    return weights


def _build_kimi_k25(path: Path, seed: int, sizing: Sizing, max_pixels: int) -> Path:
    """The family table's tiny Kimi-K2.5 in the Hub's layout, which vLLM and transformers both load.

    transformers 5.19's ``save_pretrained`` cannot write it (its reverse weight conversion renames
    the decoder's attention) and its architecture name (``Kimi_K25ForConditionalGeneration``)
    sends vLLM to its transformers backend, so the files are written here: the weights under the
    Hub's names (``kimi_k25_state_dict``), ``config.json`` with the Hub's architecture
    (``KimiK25ForConditionalGeneration``) and vision fields (SGLang's config class reads
    ``init_pos_emb_*``, ``vt_hidden_size``, ...; vLLM and transformers read transformers'), an untied
    output layer, the decoder of ``KIMI_K25_TEXT`` (and ``sizing.text``), the tower of ``sizing.vision``;
    ``processor_config.json``: transformers' processor and the ``media_proc_cfg`` for vLLM's processor (images of up to
    ``max_pixels`` pixels); the word-level tokenizer with the media tokens ``KIMI_K25_TOKENS``.
    """
    import json

    import transformers
    from safetensors.torch import save_file

    from ..families import family as family_row
    from ..testing.models import finish, jitter

    tiny = family_row("kimi_k25").tiny_model
    fields = tiny.fields({**KIMI_K25_TEXT, **sizing.text})
    fields["vision_config"] = {**fields["vision_config"], **sizing.vision}
    config = transformers.Kimi_K25Config(**fields, tie_word_embeddings=False)
    config.get_text_config().tie_word_embeddings = False
    torch.manual_seed(seed)
    model = transformers.Kimi_K25ForConditionalGeneration(config)
    jitter(model, seed)
    model = finish(model, "sdpa", torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(kimi_k25_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})

    saved = config.to_dict()
    saved["architectures"] = ["KimiK25ForConditionalGeneration"]
    saved["torch_dtype"] = "float32"
    saved["media_placeholder_token_id"] = config.image_token_id
    saved["text_config"]["architectures"] = ["DeepseekV3ForCausalLM"]  # as the Hub's (SGLang reads it)
    vision = saved["vision_config"]
    # The Hub's vision fields besides transformers' (SGLang's own config class reads these).
    vision.update({f"init_pos_emb_{side}": vision[f"pos_emb_{side}"] for side in ("height", "width", "time")})
    vision.update(
        pos_emb_type="divided_fixed",
        video_attn_type="spatial_temporal",
        merge_type="sd2_tpool",
        mm_projector_type="patchmerger",
        projector_ln_eps=config.projection_layer_norm_eps,
        vt_hidden_size=vision["hidden_size"],
        text_hidden_size=saved["text_config"]["hidden_size"],
    )
    (path / "config.json").write_text(json.dumps(saved, indent=2))

    patch = int(config.vision_config.patch_size)
    patches = max_pixels // (patch * patch)
    media = dict(
        patch_size=patch,
        merge_kernel_size=list(config.vision_config.merge_kernel_size),
        in_patch_limit=patches,
        patch_limit_on_one_side=512,  # the tower's rotary grid
        fixed_output_tokens=None,
        image_mean=list(KIMI_K25_MEAN_STD),
        image_std=list(KIMI_K25_MEAN_STD),
        temporal_merge_kernel_size=config.vision_config.pos_emb_time,
        in_patch_limit_each_frame=patches,
        in_patch_limit_video=None,
    )
    # transformers' processor of the same sizes (navit resize within the patch budget, padding to
    # whole pooling windows: what vLLM's processor does), for the benchmark's reference; vLLM reads
    # ``media_proc_cfg`` beside its fields.
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor
    from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor

    sizes = dict(patch_size=patch, merge_size=int(config.vision_config.merge_kernel_size[0]))
    transformers.Kimi_K25Processor(
        image_processor=Kimi_K25ImageProcessor(
            **sizes,
            max_patches=patches,
            size={"max_height": media["patch_limit_on_one_side"], "max_width": media["patch_limit_on_one_side"]},
            image_mean=list(KIMI_K25_MEAN_STD),
            image_std=list(KIMI_K25_MEAN_STD),
        ),
        tokenizer=build_tokenizer(KIMI_K25_TOKENS),
        video_processor=Kimi_K25VideoProcessor(**sizes),
    ).save_pretrained(path)
    # Both read the image processor's entry of processor_config.json.
    processor_file = path / "processor_config.json"
    saved = json.loads(processor_file.read_text())
    saved["image_processor"]["media_proc_cfg"] = media
    processor_file.write_text(json.dumps(saved, indent=2))
    return path


def _tiny_internvl(seed: int, sizing: Sizing | None = None, processor: Any = None) -> Any:
    """The tiny ``InternVLForConditionalGeneration`` both InternVL checkpoints save (``sizing``: its
    tower's and decoder's fields changed, the config's tokens per tile and ``processor`` sized to
    the tower)."""
    if sizing is None or not (sizing.vision or sizing.text):
        model = build_model("internvl", seed=seed, text_overrides=INTERNVL_TEXT_OVERRIDES)
    else:  # what build_model does, with the fields changed
        import transformers

        from ..families import family as family_row
        from ..testing.models import finish, jitter

        tiny = family_row("internvl").tiny_model
        fields = tiny.fields({**INTERNVL_TEXT_OVERRIDES, **sizing.text})
        fields["vision_config"] = {**fields["vision_config"], **sizing.vision}
        config = transformers.InternVLConfig(**fields)
        if sizing.vision:
            size_to_tower("internvl", config, processor, sizing.use)
        torch.manual_seed(seed)
        model = transformers.InternVLForConditionalGeneration(config)
        jitter(model, seed)
        model = finish(model, "sdpa", torch.float32)
    model.config.architectures = ["InternVLForConditionalGeneration"]
    # transformers ties InternVL's output embeddings by default, vLLM's decoder reads the text
    # config (untied): save an output layer of its own. Tied, the tiny decoder repeats the prompt's
    # last token whatever the image, and ``generate`` tests would check nothing.
    model.config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(model.lm_head.weight.shape, generator=generator) * model.config.text_config.initializer_range
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


def _build_internvl(path: Path, seed: int, sizing: Sizing) -> Path:
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    size = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            size=size, crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES
        ),
        tokenizer=build_tokenizer(INTERNVL_SPECIAL_TOKENS, INTERNVL_NAMED_TOKENS),
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
    )
    _tiny_internvl(seed, sizing, processor).save_pretrained(path)  # sizes the processor to its tower
    processor.save_pretrained(path)
    return path


# transformers' InternVL weight names -> InternVL's own (the inverse of transformers' conversion).
_INTERNVL_CHAT_NAMES = (
    ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("model.vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("model.vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
    ("model.multi_modal_projector.linear_1.", "mlp1.1."),
    ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def internvl_chat_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """A transformers ``InternVLForConditionalGeneration``'s weights under InternVL's own names:
    ``q_proj`` / ``k_proj`` / ``v_proj`` concatenated into ``attn.qkv`` (rows ``[q; k; v]``)."""
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for old, new in _INTERNVL_CHAT_NAMES:
            name = name.replace(old, new)
        weights[name] = tensor.detach().clone().contiguous()
    for name in [n for n in weights if ".attention.q_proj." in n]:
        parts = [weights.pop(name.replace(".q_proj.", f".{x}_proj.")) for x in "qkv"]
        weights[name.replace(".attention.q_proj.", ".attn.qkv.")] = torch.cat(parts)
    return weights


def _build_internvl_chat(path: Path, seed: int) -> Path:
    import json
    import shutil

    from safetensors.torch import save_file

    model = _tiny_internvl(seed)
    vision, text = model.config.vision_config, model.config.text_config
    path.mkdir(parents=True, exist_ok=True)
    save_file(internvl_chat_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(Path(__file__).with_name("internvl_chat_config.py"), path / "configuration_internvl_chat.py")
    llm_config = {**text.to_dict(), "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": False}
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "model_type": "internvl_chat",
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "image_size": INTERNVL_TILE,
            "patch_size": vision.patch_size[0],
            "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": vision.hidden_act,
        },
        "llm_config": llm_config,
        "select_layer": model.config.vision_feature_layer,
        "force_image_size": INTERNVL_TILE,
        "downsample_ratio": model.config.downsample_ratio,
        "ps_version": "v2",  # transformers' pixel shuffle
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": INTERNVL_MAX_TILES,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(INTERNVL_CHAT_SPECIAL_TOKENS).save_pretrained(path)
    return path


def qwen_encoder_inputs(
    vision_config: Any, grid_thw: list[list[int]], *, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(kwargs, pixels)``: what vLLM's Qwen models' ``embed_multimodal(**kwargs)`` takes for
    random patches of the ``grid_thw`` rows (a video when the first row has ``t > 1``), and the
    patches ``[n, C * T * p * p]`` (``ipcv_kernels.testing.models.sample_pixels``)."""
    pixels, grid = sample_pixels(vision_config, grid_thw, seed=seed)
    key = "video" if grid_thw[0][0] > 1 else "image"
    return {"pixel_values_videos" if key == "video" else "pixel_values": pixels, f"{key}_grid_thw": grid}, pixels


def internvl_encoder_inputs(
    family: str, tiles_per_item: list[int], *, video: bool = False, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(kwargs, tiles)``: what vLLM's InternVL model of a ``family`` checkpoint (``"internvl"``
    or ``"internvl_chat"``) takes in ``embed_multimodal(**kwargs)`` for random tiles, images of
    ``tiles_per_item`` tiles (or videos of that many frames), and the tiles ``[tiles, 3, 16, 16]``."""
    if family not in ("internvl", "internvl_chat"):
        raise ValueError(f"family must be 'internvl' or 'internvl_chat', got {family!r}")
    chat = family == "internvl_chat"
    tiles = internvl_tiles(sum(tiles_per_item), seed=seed)
    if video:
        pixels, token = ("pixel_values_flat_video", "<|video_pad|>") if chat else ("pixel_values_videos", "<video>")
        kwargs = {pixels: tiles, "video_num_patches": torch.tensor(tiles_per_item)}
        kwargs["video_token_id"] = torch.tensor(INTERNVL_CHAT_SPECIAL_TOKENS[token])
    else:
        kwargs = {
            "pixel_values_flat" if chat else "pixel_values": tiles,
            "image_num_patches": torch.tensor(tiles_per_item),
        }
        kwargs["image_token_id"] = torch.tensor(INTERNVL_IMAGE_TOKEN)
    return kwargs, tiles


def minicpmv_encoder_inputs(
    vision_config: Any, images: list[list[tuple[int, int]]], *, seed: int = 0
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """``(kwargs, pixels, target_sizes)``: what vLLM's MiniCPM-V model takes in
    ``embed_multimodal(**kwargs)`` for random slices, ``images`` a list of each image's slices
    ``(rows, columns)`` in patches (each image's slices padded to its longest, ``[slices, C, p,
    L]``, and their ``tgt_sizes``); and the same slices as transformers takes them, packed
    ``[1, C, p, n p]`` with ``target_sizes`` int32 ``[S, 2]``
    (``ipcv_kernels.testing.models.minicpmv_pixels``)."""
    sizes = [size for image in images for size in image]
    pixels, target_sizes = minicpmv_pixels(vision_config, sizes, seed=seed)
    columns = (target_sizes.prod(-1) * vision_config.patch_size).tolist()
    slices = iter(pixels[0].split(columns, dim=-1))
    per_image = []
    for image in images:
        own = [next(slices) for _ in image]
        padded = torch.zeros(len(own), *own[0].shape[:2], max(s.shape[-1] for s in own))
        for target, source in zip(padded, own, strict=True):
            target[..., : source.shape[-1]] = source
        per_image.append(padded)
    kwargs = {"pixel_values": per_image, "tgt_sizes": [torch.tensor(image) for image in images]}
    return kwargs, pixels, target_sizes


def shutdown_engine(llm: Any) -> None:
    """Shut a ``vllm.LLM`` down now (its engine core, worker processes and parallel groups).

    Left to the garbage collector, an in-process engine tears down vLLM's process-wide parallel
    groups whenever it happens to be collected, possibly under the next engine of the process
    (``pipeline model parallel group is not initialized``); tests that start several engines in
    one process shut each down before the next.
    """
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def allow_in_process_engines_after_numba() -> None:
    """Let an in-process vLLM 0.32 CPU engine start in a process that imported numba.

    Without Triton, vLLM's CPU worker rebinds some Triton kernels to C++ ones at start
    (``register_triton_kernel_overrides``) by scanning every attribute of every imported module,
    reading ``vars(value)`` where ``hasattr(value, "__dict__")``. numba's llvmlite holds a library
    wrapper (``llvmlite.binding.ffi.lib``) whose ``__getattr__`` wraps any name as a C function,
    ``__dict__`` included, so the scan fails (``'_lib_fn_wrapper' object has no attribute
    'get'``). Kimi-K2.5's processor in vLLM imports numba before an in-process engine's worker
    starts (a spawned worker imports it later, and is unaffected). Giving the wrapper an empty
    ``__dict__`` entry lets the scan pass it; llvmlite never looks the name up itself. A no-op
    without llvmlite; idempotent.
    """
    if importlib.util.find_spec("llvmlite") is None:
        return
    from llvmlite.binding import ffi

    ffi.lib._fntab.setdefault("__dict__", {})


_TORCHVISION_SCHEMAS: list[Any] = []  # the library fragment must stay alive


def define_torchvision_op_schemas() -> None:
    """Let PyPI's CPU-incompatible torchvision import next to CPU torch (call before importing it).

    PyPI's torchvision 0.28.0 matches torch 2.13 but is a CUDA build: its compiled ops
    (``torchvision/_C.so``) cannot load next to the CPU wheel, which torchvision tolerates, except
    that ``torchvision._meta_registrations`` registers fake kernels for ``torchvision::nms`` and
    ``torchvision::qnms`` unconditionally (``operator torchvision::nms does not exist``). Defining
    those two schemas (no kernels) lets it import; its transforms are pure PyTorch, which is all
    transformers' Qwen2-VL image and video processors use. Calling ``nms`` then raises. A no-op
    once defined, without torchvision, or when torchvision's ops load (a matching build).

    vLLM imports torchvision in subprocesses too (its model inspection), so the vLLM test
    environment runs this at every interpreter start: ``.ci/run`` writes a ``.pth`` file doing so.
    """
    if _TORCHVISION_SCHEMAS:
        return
    spec = importlib.util.find_spec("torchvision")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return
    try:  # what torchvision's import does first; succeeds for a matching build
        torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))
        return
    except (OSError, ImportError):
        pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.append(library)
