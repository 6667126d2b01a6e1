"""Hugging Face models of every supported family built from small configs with seeded random weights.

Used by the demo, the tests and the benchmarks: no weights are downloaded. Equivalence shown on
random weights carries over to real checkpoints, since IPCV never looks at weight values except
through the model's own modules.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TINY_VISION = dict(
    depth=6,
    embed_dim=64,
    num_heads=4,
    mlp_ratio=2,
    hidden_size=48,
    patch_size=2,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
)
TINY_TEXT = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_SPECIAL_TOKENS = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)


def qwen2_vl_vision_config(attn_implementation: str = "sdpa", **overrides: Any) -> PretrainedConfig:
    """A ``Qwen2VLVisionConfig``: the tiny one by default, any field overridable."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    config = Qwen2VLVisionConfig(**{**TINY_VISION, **overrides})
    config._attn_implementation = attn_implementation
    return config


def build_qwen2_vl_tower(
    config: PretrainedConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """A ``Qwen2VisionTransformerPretrainedModel`` in eval mode with seeded random weights."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    tower = Qwen2VisionTransformerPretrainedModel(config if config is not None else qwen2_vl_vision_config())
    return tower.to(device=device, dtype=dtype).eval()


def build_qwen2_vl_model(
    *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, **vision_overrides: Any
) -> nn.Module:
    """A tiny ``Qwen2VLForConditionalGeneration`` (text + vision) with seeded random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = {**TINY_VISION, **vision_overrides, "hidden_size": TINY_TEXT["hidden_size"]}
    config = Qwen2VLConfig(text_config=dict(TINY_TEXT), vision_config=vision, **TINY_SPECIAL_TOKENS)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).to(dtype=dtype).eval()


def sample_pixels(
    vision_config: PretrainedConfig, grid_thw: list[list[int]], *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flattened patches for ``grid_thw`` rows, as Qwen2-VL's processor lays them out.

    Returns ``(pixel_values [n, C * T * p * p], grid_thw int64 [B, 3])``.
    """
    grid = torch.tensor(grid_thw, dtype=torch.int64)
    patch = (
        vision_config.in_channels
        * vision_config.temporal_patch_size
        * vision_config.patch_size
        * vision_config.patch_size
    )
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(-1).sum()), patch, generator=generator).to(dtype)
    return pixels, grid


def placeholder_prompt(
    counts: Sequence[int], token: int, bounds: tuple[int, int], *, text_len: int = 5, **pixels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One prompt: ``text_len`` text tokens, per item ``start, token * count, end`` (``bounds``),
    ``text_len`` text tokens; ``input_ids`` / ``attention_mask`` ``[1, L]`` and the ``pixels`` fields."""
    start, end = bounds
    ids: list[int] = [3 + i for i in range(text_len)]
    for count in counts:
        ids += [start, *[token] * count, end]
    ids += [10 + i for i in range(text_len)]
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}


def vision_inputs(
    model: nn.Module,
    grid_thw: list[list[int]],
    *,
    video: bool = False,
    text_len: int = 5,
    seed: int = 0,
    bounds: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt: text, each item's vision placeholders, text, and the pixels.

    ``bounds``: the tokens around each item's placeholders (default: the config's
    ``vision_start_token_id`` / ``vision_end_token_id``, Qwen's).

    Returns ``input_ids``/``attention_mask`` ``[1, L]``, ``pixel_values[_videos]``,
    ``image|video_grid_thw``, and ``mm_token_type_ids`` (0 text, 1 image, 2 video) where the
    installed transformers' forward takes it.
    """
    config = model.config
    merge = config.vision_config.spatial_merge_size**2
    token = config.video_token_id if video else config.image_token_id
    pixels, grid = sample_pixels(config.vision_config, grid_thw, dtype=model.dtype, seed=seed)
    prefix = "video" if video else "image"
    inputs = placeholder_prompt(
        [t * h * w // merge for t, h, w in grid_thw],
        token,
        bounds or (config.vision_start_token_id, config.vision_end_token_id),
        text_len=text_len,
        **{"pixel_values_videos" if video else "pixel_values": pixels, f"{prefix}_grid_thw": grid},
    )
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == token).long() * (2 if video else 1)
    return inputs


# -- Qwen2.5-VL, Qwen3-VL, InternVL ------------------------------------------------------------
_QWEN_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=48,
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
QWEN2_5_VISION = {
    **_QWEN_VISION,
    "window_size": 8,  # 2 x 2 merge units = 4 x 4 patches per window
    "fullatt_block_indexes": [2, 5],
}
QWEN3_VISION = {**_QWEN_VISION, "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 3, 4]}
QWEN3_TEXT = {
    **TINY_TEXT,
    "head_dim": 12,
    "rope_parameters": {**TINY_TEXT["rope_parameters"], "mrope_interleaved": True},
}
# Qwen3.5: Qwen3-VL's tower without DeepStack; a hybrid decoder (Gated DeltaNet linear-attention
# layers, a full-attention layer every second one here), dense or MoE.
QWEN3_5_VISION = {**_QWEN_VISION, "num_position_embeddings": 64}
QWEN3_5_TEXT = {
    **QWEN3_TEXT,
    "rope_parameters": {**QWEN3_TEXT["rope_parameters"], "partial_rotary_factor": 1.0},
    "layer_types": ["linear_attention", "full_attention"] * 2,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
QWEN3_5_MOE_TEXT = {
    **QWEN3_5_TEXT,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
}
# GLM-4.1V / 4.5V / 4.6V: RMSNorm blocks with a gated MLP of width ``out_hidden_size``, learned
# position embeddings on an 8 x 8 grid (16-pixel images of 2-pixel patches) resampled per image, a
# downsampling convolution and merger after the tower; a GLM-4 decoder (interleaved partial rotary).
GLM4V_VISION = dict(
    depth=6,
    hidden_size=64,
    num_heads=4,
    intermediate_size=96,
    out_hidden_size=48,
    patch_size=2,
    image_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
GLM4V_TEXT = {
    **TINY_TEXT,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [1, 1, 1],
        "partial_rotary_factor": 0.5,
    },
}
GLM4V_SPECIAL_TOKENS = dict(
    image_token_id=120,
    video_token_id=121,
    image_start_token_id=122,
    image_end_token_id=123,
    # After the tiny processor's chat tokens (124, 125): GLM's ids as Qwen's, so it serves both.
    video_start_token_id=126,
    video_end_token_id=127,
)
INTERNVL_VISION = dict(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=96,
    image_size=16,
    patch_size=4,  # 16 patches + CLS per tile
    use_qk_norm=True,
    norm_type="rms_norm",
    layer_scale_init_value=0.5,
)
INTERNVL_TEXT = {
    **{key: value for key, value in TINY_TEXT.items() if key != "rope_parameters"},  # plain Qwen2 rope
    "model_type": "qwen2",
    "num_hidden_layers": 2,
}
INTERNVL_IMAGE_TOKEN = 120
INTERNVL_TOKENS_PER_TILE = 4  # 4 x 4 patches, pixel-shuffled by 0.5


def finish(model: nn.Module, attn: str, dtype: torch.dtype) -> nn.Module:
    for config in (model.config, *(getattr(model.config, n, None) for n in ("vision_config", "text_config"))):
        if config is not None:
            config._attn_implementation = attn
    return to_real_dtype(model, dtype).eval()


def to_real_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype=dtype)`` with its complex buffers left complex.

    ``Module.to(dtype)`` casts complex buffers to the real dtype, dropping their imaginary part:
    Llama 4's rotary table ``freqs_ci`` stays complex, as the model builds and loads it.
    """
    complex_buffers = [(name, buffer) for name, buffer in model.named_buffers() if buffer.is_complex()]
    with warnings.catch_warnings():  # the cast's "discards the imaginary part", undone below
        warnings.filterwarnings("ignore", message="Casting complex values to real")
        model = model.to(dtype=dtype)
    for name, buffer in complex_buffers:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    return model


def jitter(model: nn.Module, seed: int) -> None:
    """Perturb every parameter (zero-initialised ones too: CLS token, position embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


# CLIP / SigLIP towers: 32 x 32 images of 8 x 8 patches (16 patches; CLIP adds a CLS token).
CLIP_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)
SIGLIP_VISION = {**CLIP_VISION, "model_type": "siglip_vision_model"}
# Llama / Gemma decoders for LLaVA, Gemma 3 and PaliGemma (vocabulary above their image tokens).
CLIP_FAMILY_TEXT = dict(
    vocab_size=300,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
CLIP_FAMILY_IMAGE_TOKEN = 260
CLIP_PATCHES = 16  # patches per 32 x 32 image or crop

# Idefics3 / SmolVLM: 32 x 32 sub-images of 4 x 4 patches, pixel-shuffled by 2 into 4 tokens each.
IDEFICS3_VISION = {**CLIP_VISION, "model_type": "idefics3_vision"}
IDEFICS3_TOKENS_PER_SUB_IMAGE = 4
# LLaVA-OneVision: SigLIP over 32 x 32 crops, a Qwen2 decoder, anyres grids up to 2 x 2 crops.
ONEVISION_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _text(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    return {**base, **overrides}


# -- tiny full models: each family's config fields given text-config overrides (the family table's
# ``TinyModel.fields``; ``ipcv_kernels.families.build_model`` builds them) ---------------------
def qwen2_vl_fields(text: dict[str, Any]) -> dict[str, Any]:
    text_config = _text(TINY_TEXT, text)
    vision = {**TINY_VISION, "hidden_size": text_config["hidden_size"]}
    return dict(text_config=text_config, vision_config=vision, **TINY_SPECIAL_TOKENS)


def qwen2_5_vl_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(text_config=_text(TINY_TEXT, text), vision_config=dict(QWEN2_5_VISION), **TINY_SPECIAL_TOKENS)


def qwen3_vl_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(text_config=_text(QWEN3_TEXT, text), vision_config=dict(QWEN3_VISION), **TINY_SPECIAL_TOKENS)


def qwen3_5_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(text_config=_text(QWEN3_5_TEXT, text), vision_config=dict(QWEN3_5_VISION), **TINY_SPECIAL_TOKENS)


def qwen3_5_moe_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(text_config=_text(QWEN3_5_MOE_TEXT, text), vision_config=dict(QWEN3_5_VISION), **TINY_SPECIAL_TOKENS)


def glm4v_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(text_config=_text(GLM4V_TEXT, text), vision_config=dict(GLM4V_VISION), **GLM4V_SPECIAL_TOKENS)


def internvl_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vision_config=dict(INTERNVL_VISION),
        text_config=_text(INTERNVL_TEXT, text),
        image_token_id=INTERNVL_IMAGE_TOKEN,
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
    )


def llava_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vision_config=dict(CLIP_VISION),
        text_config=_text({**CLIP_FAMILY_TEXT, "model_type": "llama"}, text),
        image_token_id=CLIP_FAMILY_IMAGE_TOKEN,
        image_seq_length=CLIP_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_next_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vision_config=dict(CLIP_VISION),
        text_config=_text({**CLIP_FAMILY_TEXT, "model_type": "llama"}, text),
        image_token_id=CLIP_FAMILY_IMAGE_TOKEN,
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_layer=-2,
    )


def onevision_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vision_config=dict(SIGLIP_VISION),
        text_config=_text({**INTERNVL_TEXT, "vocab_size": CLIP_FAMILY_TEXT["vocab_size"]}, text),
        image_token_index=CLIP_FAMILY_IMAGE_TOKEN,
        video_token_index=CLIP_FAMILY_IMAGE_TOKEN + 1,
        image_grid_pinpoints=ONEVISION_PINPOINTS,
    )


def idefics3_fields(family: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Idefics3's or SmolVLM's (``family``: the ``model_type``) config fields."""

    def fields(text: dict[str, Any]) -> dict[str, Any]:
        return dict(
            vision_config={**IDEFICS3_VISION, "model_type": f"{family}_vision"},
            text_config=_text({**CLIP_FAMILY_TEXT, "model_type": "llama"}, text),
            image_token_id=CLIP_FAMILY_IMAGE_TOKEN,
            scale_factor=2,
        )

    return fields


def gemma3_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vision_config=dict(SIGLIP_VISION),
        text_config=_text({**CLIP_FAMILY_TEXT, "model_type": "gemma3_text", "head_dim": 12, "sliding_window": 8}, text),
        mm_tokens_per_image=4,
        image_token_index=CLIP_FAMILY_IMAGE_TOKEN,
        boi_token_index=CLIP_FAMILY_IMAGE_TOKEN + 1,
        eoi_token_index=CLIP_FAMILY_IMAGE_TOKEN + 2,
    )


def paligemma_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vision_config={**SIGLIP_VISION, "projection_dim": CLIP_FAMILY_TEXT["hidden_size"]},
        text_config=_text({**CLIP_FAMILY_TEXT, "model_type": "gemma", "head_dim": 12}, text),
        image_token_index=CLIP_FAMILY_IMAGE_TOKEN,
        projection_dim=CLIP_FAMILY_TEXT["hidden_size"],
    )


def internvl_inputs(model: nn.Module, tiles_per_image: list[int], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: text, then per image ``<start> <image>*(4 * tiles) <end>``, then text; and the tiles."""
    ids: list[int] = [3, 4, 5]
    for tiles in tiles_per_image:
        ids += [121, *[INTERNVL_IMAGE_TOKEN] * (INTERNVL_TOKENS_PER_TILE * tiles), 122]
    ids += [10, 11]
    input_ids = torch.tensor([ids])
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(tiles_per_image), 3, 16, 16, generator=generator).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def internvl_tiles(count: int, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """``count`` random InternVL tiles ``[count, 3, 16, 16]`` for the tiny tower."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 16, 16, generator=generator).to(dtype)


def clip_pixels(count: int, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """``count`` random 32 x 32 images (or crops) ``[count, 3, 32, 32]`` for the tiny CLIP / SigLIP towers."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 32, 32, generator=generator).to(dtype)


def clip_family_inputs(model: nn.Module, num_images: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt for a tiny LLaVA / Gemma 3 / PaliGemma model: text and ``num_images`` images,
    each as the image-token run its model expects (LLaVA: 16 features, CLS dropped; Gemma 3:
    ``<boi>`` 4 pooled tokens ``<eoi>``; PaliGemma: 16 tokens, images first)."""
    config = model.config
    image = config.image_token_id
    if config.model_type == "gemma3":
        run = [image + 1, *[image] * config.mm_tokens_per_image, image + 2]
    else:
        run = [image] * CLIP_PATCHES
    if config.model_type == "paligemma":
        ids = [*run * num_images, 2, 5, 6, 7]
    else:
        ids = [3, 4, 5]
        for _ in range(num_images):
            ids += [*run, 6]
    input_ids = torch.tensor([ids])
    pixels = clip_pixels(num_images, dtype=model.dtype, seed=seed)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def idefics3_pixels(
    sub_images: list[int], *, padded_columns: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Idefics3 / SmolVLM processor-like inputs: ``pixel_values`` ``[B, N, 3, 32, 32]`` with prompt
    ``b`` holding ``sub_images[b]`` random sub-images and all-zero padding images after them
    (``N = max(sub_images)``), and ``pixel_attention_mask`` int64 ``[B, N, 32, 32]``.

    ``padded_columns``: the last sub-image of every prompt is narrower by that many pixels (a
    multiple of the patch size 8 gives whole padding patches): zeros there, masked out.
    """
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(sub_images), max(sub_images), 3, 32, 32)
    mask = torch.zeros(len(sub_images), max(sub_images), 32, 32, dtype=torch.int64)
    for b, count in enumerate(sub_images):
        pixels[b, :count] = torch.randn(count, 3, 32, 32, generator=generator)
        mask[b, :count] = 1
        if padded_columns and count:
            pixels[b, count - 1, :, :, 32 - padded_columns :] = 0
            mask[b, count - 1, :, 32 - padded_columns :] = 0
    return pixels.to(dtype), mask


def idefics3_inputs(
    model: nn.Module, sub_images: list[int], *, padded_columns: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Prompts for a tiny Idefics3 / SmolVLM model: prompt ``b`` is text, then per real sub-image
    ``<fake> <image>*4``, then ``<fake>`` and text (left-padded to one length), and the pixels of
    ``idefics3_pixels``."""
    image = model.config.image_token_id
    rows = []
    for count in sub_images:
        ids = [3, 4, 5]
        for _ in range(count):
            ids += [image + 1, *[image] * IDEFICS3_TOKENS_PER_SUB_IMAGE]
        rows.append([*ids, image + 1, 6, 7])
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    pixels, pixel_mask = idefics3_pixels(sub_images, padded_columns=padded_columns, dtype=model.dtype, seed=seed)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixels,
        "pixel_attention_mask": pixel_mask,
    }


def onevision_inputs(
    model: nn.Module, image_sizes: list[list[int]], *, batch_num_images: list[int] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One prompt for a tiny LLaVA-OneVision model: text, then every image's token run, then text.

    Images of ``image_sizes`` (height, width) arrive as the processor lays them out: ``pixel_values``
    ``[num_images, 5, 3, 32, 32]`` (a base crop and up to 4 grid crops, random), ``image_sizes``,
    and ``batch_num_images`` where given. The token runs are as long as the model's
    ``get_image_features`` makes them (unpadding and newlines), read from one unpatched call.
    """
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(image_sizes), 5, 3, 32, 32, generator=generator).to(model.dtype)
    sizes = torch.tensor(image_sizes)
    extra = {} if batch_num_images is None else {"batch_num_images": torch.tensor(batch_num_images)}
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, **extra).pooler_output
    ids = [3, 4, 5]
    for feature in features:
        ids += [*[model.config.image_token_id] * feature.shape[0], 6]
    input_ids = torch.tensor([[*ids, 7, 8]])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels,
        "image_sizes": sizes,
        **extra,
    }


# -- one prompt per family, ``(model, num_images, seed) -> inputs`` (the family table's
# ``TinyModel.prompt``): the images differ in size where the family allows it ------------------------
def qwen_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: images of 4 x 4, 4 x 6, 4 x 8, ... patches."""
    return vision_inputs(model, [[1, 4, 4 + 2 * i] for i in range(num_images)], seed=seed)


def glm4v_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """GLM-4.1V / 4.5V / 4.6V: images of 4 x 4, 4 x 6, ... patches between its image bounds."""
    config = model.config
    grid = [[1, 4, 4 + 2 * i] for i in range(num_images)]
    return vision_inputs(model, grid, seed=seed, bounds=(config.image_start_token_id, config.image_end_token_id))


def internvl_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """InternVL: images of 2, 1, 2, ... tiles."""
    return internvl_inputs(model, [2 - i % 2 for i in range(num_images)], seed=seed)


def clip_family_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaVA 1.5 / Gemma 3 / PaliGemma: ``clip_family_inputs``."""
    return clip_family_inputs(model, num_images, seed=seed)


def anyres_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaVA-NeXT / OneVision: images of 64 x 64, 32 x 64, 64 x 32, ... pixels (5, 3, 3 crops)."""
    sizes = [[64, 64], [32, 64], [64, 32]]
    return onevision_inputs(model, [sizes[i % 3] for i in range(num_images)], seed=seed)


def idefics3_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Idefics3 / SmolVLM: one prompt of ``num_images`` sub-images, the last with padding patches."""
    return idefics3_inputs(model, [num_images], padded_columns=8, seed=seed)


# -- image processors for a tower's patch sizes (the family table's ``Family.image_processor``) ----
def _tile_side(vision_config: Any) -> int:
    side = vision_config.image_size
    return side[0] if isinstance(side, (list, tuple)) else side


def qwen_image_processor(vision_config: Any) -> Any:
    """Qwen2-VL's processor with the tower's patch sizes, at least one merge unit, no upper bound."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = vision_config.patch_size * vision_config.spatial_merge_size
    return Qwen2VLImageProcessorPil(
        patch_size=vision_config.patch_size,
        merge_size=vision_config.spatial_merge_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        size={"shortest_edge": unit * unit, "longest_edge": 1 << 40},
    )


def glm4v_image_processor(vision_config: Any) -> Any:
    """GLM-4.1V's processor with the tower's patch sizes, at least one merge unit, no upper bound."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    unit = vision_config.patch_size * vision_config.spatial_merge_size
    return Glm4vImageProcessorPil(
        patch_size=vision_config.patch_size,
        merge_size=vision_config.spatial_merge_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        size={"shortest_edge": unit * unit, "longest_edge": 1 << 40},
    )


def internvl_image_processor(vision_config: Any) -> Any:
    """InternVL's (``GotOcr2ImageProcessorPil``): tiles of the tower's size, at most 4 and a thumbnail."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    side = _tile_side(vision_config)
    return GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True, max_patches=4)


def clip_image_processor(vision_config: Any) -> Any:
    """CLIP's: shortest edge to the tower's size, centre crop."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    side = _tile_side(vision_config)
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def siglip_image_processor(vision_config: Any) -> Any:
    """SigLIP's: resized to the tower's size."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    side = _tile_side(vision_config)
    return SiglipImageProcessorPil(size={"height": side, "width": side})


# -- Gemma 4: a padded batch of 4-pixel patches, pooled 2 x 2; a patch budget of 16 soft tokens (64
# patch rows) for the tools' calls (``default_output_length``, read by ``bench.calls.PatchCalls``).
GEMMA4_VISION = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=64,
    default_output_length=16,
)
GEMMA4_PATCH_DIM = 3 * 4 * 4
# The decoder: one sliding-window layer, then the global one Gemma 4 ends with; head sizes vLLM's
# CPU attention takes; a small per-layer-input (PLE) table.
GEMMA4_TEXT = dict(
    vocab_size=300,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=32,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    vocab_size_per_layer_input=300,
    hidden_size_per_layer_input=8,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
GEMMA4_TOKENS = dict(
    image_token_id=CLIP_FAMILY_IMAGE_TOKEN,
    boi_token_id=CLIP_FAMILY_IMAGE_TOKEN + 1,
    eoi_token_id=CLIP_FAMILY_IMAGE_TOKEN + 2,
    video_token_id=CLIP_FAMILY_IMAGE_TOKEN + 3,
    boa_token_id=CLIP_FAMILY_IMAGE_TOKEN + 4,
    eoa_token_index=CLIP_FAMILY_IMAGE_TOKEN + 5,
    audio_token_id=CLIP_FAMILY_IMAGE_TOKEN + 6,
)


def gemma4_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        text_config=_text(GEMMA4_TEXT, text), vision_config=dict(GEMMA4_VISION), audio_config=None, **GEMMA4_TOKENS
    )


def gemma4_patches(
    grids: list[tuple[int, int]], length: int, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 4 processor-like inputs for images of ``grids`` ``(rows, cols)`` patches:
    ``pixel_values`` ``[B, length, 48]`` (random in ``[0, 1]``, zero on padding) and
    ``pixel_position_ids`` int64 ``[B, length, 2]`` (``(x, y)`` row-major, ``-1`` on padding)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(grids), length, GEMMA4_PATCH_DIM)
    positions = torch.full((len(grids), length, 2), -1, dtype=torch.int64)
    for image, (rows, cols) in enumerate(grids):
        pixels[image, : rows * cols] = torch.rand(rows * cols, GEMMA4_PATCH_DIM, generator=generator)
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        positions[image, : rows * cols] = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)
    return pixels.to(dtype), positions


def gemma4_inputs(
    model: nn.Module, grids: list[tuple[int, int]], *, length: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One prompt for a tiny Gemma 4 model: text, then per image ``<boi> <image>*(rows * cols / 4)
    <eoi>`` (its pooled soft tokens), then text; and the images of ``gemma4_patches``."""
    pool = model.config.vision_config.pooling_kernel_size**2
    ids = [2, 3, 4]
    for rows, cols in grids:
        ids += [GEMMA4_TOKENS["boi_token_id"], *[GEMMA4_TOKENS["image_token_id"]] * (rows * cols // pool)]
        ids += [GEMMA4_TOKENS["eoi_token_id"], 5]
    input_ids = torch.tensor([[*ids, 6, 7]])
    pixels, positions = gemma4_patches(grids, length, dtype=model.dtype, seed=seed)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels,
        "image_position_ids": positions,
    }


def gemma4_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gemma 4: images of 6 x 8, 10 x 6, 8 x 8, ... patches (padding in all but the square ones)."""
    grids = [(6, 8), (10, 6), (8, 8)]
    return gemma4_inputs(model, [grids[i % 3] for i in range(num_images)], seed=seed)


def gemma4_image_processor(vision_config: Any) -> Any:
    """Gemma 4's (``Gemma4ImageProcessorPil``) with the tower's patch and pooling sizes and the
    smallest budget it supports (70 soft tokens)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(
        patch_size=vision_config.patch_size, pooling_kernel_size=vision_config.pooling_kernel_size, max_soft_tokens=70
    )


# -- Kimi-K2.5: a MoonViT tower over 2 x 2-pixel patches, pooled 2 x 2 (and over a clip's frames),
# and a two-layer DeepSeek-V3 decoder (MLA attention, layer 1 a MoE of 4 routed experts) ------------
KIMI_K25_VISION = dict(
    patch_size=2,
    pos_emb_height=8,
    pos_emb_width=8,
    pos_emb_time=4,
    num_attention_heads=4,
    num_hidden_layers=6,
    hidden_size=64,
    intermediate_size=96,
    merge_kernel_size=[2, 2],
)
KIMI_K25_TEXT = dict(
    model_type="deepseek_v3",
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def kimi_k25_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        text_config=_text(KIMI_K25_TEXT, text),
        vision_config=dict(KIMI_K25_VISION),
        projection_hidden_size=KIMI_K25_VISION["hidden_size"],
        **TINY_SPECIAL_TOKENS,
    )


def kimi_k25_pixels(
    vision_config: Any, grid_thw: list[list[int]], *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches for ``grid_thw`` rows as Kimi-K2.5's processor lays them out: ``(pixel_values
    [n, 3, p, p]`` (each frame row-major), ``grid_thw`` int64 ``[B, 3])``."""
    grid = torch.tensor(grid_thw, dtype=torch.int64)
    p = vision_config.patch_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3, p, p, generator=generator).to(dtype)
    return pixels, grid


def kimi_k25_inputs(model: nn.Module, grid_thw: list[list[int]], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: text, per image ``<start> <image> * (h * w / 4) <end>``, text; and the patches.

    (A clip of ``t`` frames pools into the tokens of one frame, so ``t`` does not change its count.)
    """
    config = model.config
    kh, kw = config.vision_config.merge_kernel_size
    pixels, grid = kimi_k25_pixels(config.vision_config, grid_thw, dtype=model.dtype, seed=seed)
    return placeholder_prompt(
        [h * w // (kh * kw) for _, h, w in grid_thw],
        config.image_token_id,
        (config.vision_start_token_id, config.vision_end_token_id),
        text_len=3,
        pixel_values=pixels,
        image_grid_thw=grid,
    )


def kimi_k25_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Kimi-K2.5: images of 4 x 4, 4 x 6, 4 x 8, ... patches."""
    return kimi_k25_inputs(model, [[1, 4, 4 + 2 * i] for i in range(num_images)], seed=seed)


# -- Pixtral / Mistral 3 ------------------------------------------------------------------------------
# Pixtral towers over images at their own resolution: 4-pixel patches, images up to 64 x 64 pixels.
PIXTRAL_VISION = dict(
    model_type="pixtral",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    image_size=64,
    patch_size=4,
    hidden_act="silu",
)
# Mistral 3: ``[IMG]`` tokens per 2 x 2 merged patches, ``[IMG_BREAK]`` after each row of them,
# ``[IMG_END]`` replacing the last break (as ``PixtralProcessor`` lays them out).
MISTRAL3_IMAGE_TOKEN = CLIP_FAMILY_IMAGE_TOKEN
MISTRAL3_BREAK_TOKEN, MISTRAL3_END_TOKEN = CLIP_FAMILY_IMAGE_TOKEN + 1, CLIP_FAMILY_IMAGE_TOKEN + 2
# The prompt's images (height, width) in pixels, cycled: two sizes, so a call packs unequal images.
MISTRAL3_IMAGE_SIZES = ((16, 24), (24, 16))


def mistral3_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        vision_config=dict(PIXTRAL_VISION),
        text_config=_text({**CLIP_FAMILY_TEXT, "model_type": "mistral", "head_dim": 12}, text),
        image_token_index=MISTRAL3_IMAGE_TOKEN,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


def mistral3_image_run(rows: int, cols: int) -> list[int]:
    """The token run of one image of ``rows x cols`` merged tokens, as ``PixtralProcessor`` writes it."""
    run = [*([MISTRAL3_IMAGE_TOKEN] * cols + [MISTRAL3_BREAK_TOKEN])] * rows
    run[-1] = MISTRAL3_END_TOKEN
    return run


def mistral3_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt for the tiny Mistral 3: text and ``num_images`` images of ``MISTRAL3_IMAGE_SIZES``
    (cycled), zero-padded to one batch with their ``image_sizes``."""
    sizes = [MISTRAL3_IMAGE_SIZES[i % len(MISTRAL3_IMAGE_SIZES)] for i in range(num_images)]
    unit = model.config.vision_config.patch_size * model.config.spatial_merge_size
    ids = [3, 4, 5]
    for height, width in sizes:
        ids += [*mistral3_image_run(height // unit, width // unit), 6]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(num_images, 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, (height, width) in enumerate(sizes):
        pixels[i, :, :height, :width] = torch.randn(3, height, width, generator=generator)
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels.to(model.dtype),
        "image_sizes": torch.tensor(sizes),
    }


def pixtral_image_processor(vision_config: Any) -> Any:
    """Pixtral's: the longer side to at most the tower's ``image_size``, both sides rounded up to
    its patch size."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    patch = vision_config.patch_size
    return PixtralImageProcessorPil(
        size={"longest_edge": _tile_side(vision_config)}, patch_size={"height": patch, "width": patch}
    )


# -- LLaVA-OneVision-1.5: a RICE-ViT tower (a CLS row before every frame) over 2 x 2-pixel patches,
# merged 2 x 2, and a two-layer Qwen3 decoder (transformers >= 5.2x only) ----------------------------
ONEVISION1_5_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=TINY_TEXT["hidden_size"],
)
ONEVISION1_5_TEXT = {
    **{key: value for key, value in TINY_TEXT.items() if key != "rope_parameters"},  # plain 1-D rope
    "model_type": "qwen3",
    "num_hidden_layers": 2,
    "head_dim": 12,
}


def onevision1_5_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        text_config=_text(ONEVISION1_5_TEXT, text), vision_config=dict(ONEVISION1_5_VISION), **TINY_SPECIAL_TOKENS
    )


def onevision1_5_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaVA-OneVision-1.5: images of 4 x 4, 4 x 6, 4 x 8, ... patches, Qwen's prompt layout,
    patches ``[n, 3 * p * p]`` (no temporal patches)."""
    config = model.config
    grid_thw = [[1, 4, 4 + 2 * i] for i in range(num_images)]
    merge = config.vision_config.spatial_merge_size**2
    grid = torch.tensor(grid_thw, dtype=torch.int64)
    p = config.vision_config.patch_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * p * p, generator=generator).to(model.dtype)
    return placeholder_prompt(
        [t * h * w // merge for t, h, w in grid_thw],
        config.image_token_id,
        (config.vision_start_token_id, config.vision_end_token_id),
        text_len=3,
        pixel_values=pixels,
        image_grid_thw=grid,
    )


def onevision1_5_image_processor(vision_config: Any) -> Any:
    """LLaVA-OneVision-1.5's image processor for a tower's patch sizes: Qwen2-VL's (the checkpoints
    use it) without temporal patches, at least one merge unit, no upper bound."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = vision_config.patch_size * vision_config.spatial_merge_size
    return Qwen2VLImageProcessorPil(
        patch_size=vision_config.patch_size,
        merge_size=vision_config.spatial_merge_size,
        temporal_patch_size=1,
        size={"shortest_edge": unit * unit, "longest_edge": 1 << 40},
    )


# -- MiniCPM-V 4.6 / 4.7 ------------------------------------------------------------------------------
# SigLIP blocks over packed slices, 2 x 2 merged inside the tower after block ``insert_layer_id``
# (0 here, so that the table's tests prune from block 2 = insert_layer_id + 2 on); 2-pixel patches.
MINICPMV_VISION = dict(
    model_type="minicpmv4_6_vision",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=5,
    num_attention_heads=4,
    image_size=32,
    patch_size=2,
    insert_layer_id=0,
)
MINICPMV_INSERT_LAYER = 0
# The prompt's slices, (rows, columns) in patches: every image one slice of this size (transformers
# 5.17's tower takes only calls of equal slices, spec §5.14), 4 tokens after both 2 x 2 merges.
MINICPMV_SLICE = (8, 8)


def minicpmv_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(
        # transformers 5.17 needs the text config's model_type (5.2x defaults it).
        text_config=_text({**QWEN3_5_TEXT, "model_type": "qwen3_5_text"}, text),
        vision_config=dict(MINICPMV_VISION),
        insert_layer_id=MINICPMV_INSERT_LAYER,
        image_token_id=TINY_SPECIAL_TOKENS["image_token_id"],
        video_token_id=TINY_SPECIAL_TOKENS["video_token_id"],
    )


def minicpmv_pixels(
    vision_config: Any, target_sizes: list[tuple[int, int]], *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random slices as MiniCPM-V's processor packs them: ``(pixel_values [1, C, p, n p]`` (patch
    ``j`` at columns ``j p .. (j + 1) p``, each slice row-major), ``target_sizes`` int32 ``[S, 2])``."""
    p, channels = vision_config.patch_size, vision_config.num_channels
    count = sum(h * w for h, w in target_sizes)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, channels, p, count * p, generator=generator).to(dtype)
    return pixels, torch.tensor(target_sizes, dtype=torch.int32)


def minicpmv_inputs(model: nn.Module, target_sizes: list[tuple[int, int]], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: text, per slice ``<start> <image> * (h w / 16) <end>``, text; and the slices."""
    config = model.config
    pixels, sizes = minicpmv_pixels(config.vision_config, target_sizes, dtype=model.dtype, seed=seed)
    return placeholder_prompt(
        [h * w // 16 for h, w in target_sizes],
        config.image_token_id,
        (TINY_SPECIAL_TOKENS["vision_start_token_id"], TINY_SPECIAL_TOKENS["vision_end_token_id"]),
        text_len=3,
        pixel_values=pixels,
        target_sizes=sizes,
    )


def minicpmv_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """MiniCPM-V: ``num_images`` images of one ``MINICPMV_SLICE`` slice each."""
    return minicpmv_inputs(model, [MINICPMV_SLICE] * num_images, seed=seed)


def minicpmv_image_processor(vision_config: Any) -> Any:
    """MiniCPM-V's image processor (its PIL backend) for the tower's patch size, one slice per image
    (no crops: ``slice_mode=False``, so every call is of one slice, which transformers 5.17 takes
    too), sides in multiples of 4 patches."""
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    return MiniCPMV4_6ImageProcessorPil(
        patch_size=vision_config.patch_size,
        scale_resolution=_tile_side(vision_config),
        slice_mode=False,
    )


# -- Llama 4: 16 x 16-pixel tiles of 4 x 4 patches and a CLS appended last, pixel-shuffled by 0.5 to
# 2 x 2 tokens per tile; a two-layer MoE decoder (one layer without rotary, as Llama 4 interleaves them).
LLAMA4_VISION = dict(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    # The pixel shuffle turns D-wide patches into 4D-wide tokens, the adapter MLP's input width.
    intermediate_size=256,
    image_size=16,
    patch_size=4,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=32,
    projector_output_dim=32,
    vision_output_dim=32,
)
LLAMA4_TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    intermediate_size_mlp=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=2,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    attention_chunk_size=8,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# <|patch|> (the model's image token), <|image_start|>, <|image_end|>, <|image|> (before the global
# tile), <|tile_x_separator|>, <|tile_y_separator|>.
LLAMA4_TOKENS = dict(
    image_token_index=CLIP_FAMILY_IMAGE_TOKEN,
    boi_token_index=CLIP_FAMILY_IMAGE_TOKEN + 1,
    eoi_token_index=CLIP_FAMILY_IMAGE_TOKEN + 2,
)
LLAMA4_IMAGE_MARK, LLAMA4_TILE_X, LLAMA4_TILE_Y = (CLIP_FAMILY_IMAGE_TOKEN + i for i in (3, 4, 5))
LLAMA4_TOKENS_PER_TILE = 4


def llama4_fields(text: dict[str, Any]) -> dict[str, Any]:
    return dict(text_config=_text(LLAMA4_TEXT, text), vision_config=dict(LLAMA4_VISION), **LLAMA4_TOKENS)


def llama4_image_run(rows: int, cols: int) -> list[int]:
    """The token run of one image of ``rows x cols`` tiles (and a global tile when there are several),
    as ``Llama4Processor`` writes it."""
    patches = [LLAMA4_TOKENS["image_token_index"]] * LLAMA4_TOKENS_PER_TILE
    run = [LLAMA4_TOKENS["boi_token_index"]]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                run += patches + ([LLAMA4_TILE_X] if x < cols - 1 else [])
            run.append(LLAMA4_TILE_Y)
    return [*run, LLAMA4_IMAGE_MARK, *patches, LLAMA4_TOKENS["eoi_token_index"]]


def llama4_inputs(model: nn.Module, grids: list[tuple[int, int]], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt for the tiny Llama 4: text, then per image of ``(rows, cols)`` tiles its token run,
    then text; and the tiles (``rows * cols``, plus the global one when there are several)."""
    ids = [1, 3, 4]
    for rows, cols in grids:
        ids += [*llama4_image_run(rows, cols), 5]
    tiles = sum(rows * cols + (rows * cols > 1) for rows, cols in grids)
    input_ids = torch.tensor([[*ids, 6, 7]])
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(tiles, 3, 16, 16, generator=generator).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def llama4_prompt(model: nn.Module, num_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Llama 4: images of 1 x 2 tiles (3 with the global one), 1 tile, 1 x 2, ..."""
    return llama4_inputs(model, [(1, 2) if i % 2 == 0 else (1, 1) for i in range(num_images)], seed=seed)


class Llama4TileProcessor:
    """What Llama 4's image processor does, in its shape: each image resized to ``rows x cols`` tiles of
    the tower's size ``S`` (each side's tile count ``round(side / S)`` in ``1 .. max_tiles_per_side``),
    split into them row-major, plus a global tile of the whole image resized to ``S`` when there are
    several; pixels normalised to ``[-1, 1]`` (mean and std 0.5). A local stand-in: transformers'
    ``Llama4ImageProcessor`` requires torchvision, which this environment lacks (its canvas choice
    among ``max_patches`` tiles is not reproduced)."""

    def __init__(self, tile: int, max_tiles_per_side: int = 2) -> None:
        self.tile, self.max_tiles_per_side = tile, max_tiles_per_side

    def grid(self, image: Any) -> tuple[int, int]:
        """``(rows, cols)`` of tiles of a PIL image."""
        return tuple(
            min(self.max_tiles_per_side, max(1, round(side / self.tile))) for side in (image.height, image.width)
        )

    def tiles(self, image: Any) -> torch.Tensor:
        """float32 ``[T, 3, S, S]``: the tiles of a PIL image, then its global tile if ``T > 1``."""
        import numpy as np

        rows, cols = self.grid(image)
        side = self.tile

        def array(picture: Any) -> torch.Tensor:
            pixels = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)
            return ((pixels - 0.5) / 0.5).permute(2, 0, 1)

        grid = array(image.resize((cols * side, rows * side)))
        tiles = [
            grid[:, r * side : (r + 1) * side, c * side : (c + 1) * side] for r in range(rows) for c in range(cols)
        ]
        if rows * cols > 1:
            tiles.append(array(image.resize((side, side))))
        return torch.stack(tiles)

    def __call__(self, images: Any, return_tensors: str = "pt", **_: Any) -> dict[str, torch.Tensor]:
        """``pixel_values`` ``[all tiles, 3, S, S]`` of ``images`` in order."""
        return {"pixel_values": torch.cat([self.tiles(image) for image in images])}


def llama4_image_processor(vision_config: Any) -> Llama4TileProcessor:
    """``Llama4TileProcessor`` for the tower's tile size, up to 2 x 2 tiles and the global one."""
    return Llama4TileProcessor(_tile_side(vision_config))
