"""Hugging Face Qwen2-VL models built from small configs with seeded random weights.

Used by the demo, the tests and the benchmarks: no weights are downloaded. Equivalence shown on
random weights carries over to real checkpoints, since IPCV never looks at weight values except
through the model's own modules.
"""

from __future__ import annotations

import inspect
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


def vision_inputs(
    model: nn.Module, grid_thw: list[list[int]], *, video: bool = False, text_len: int = 5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt: text, each item's vision placeholders, text, and the pixels.

    Returns ``input_ids``/``attention_mask`` ``[1, L]``, ``pixel_values[_videos]``,
    ``image|video_grid_thw``, and ``mm_token_type_ids`` (0 text, 1 image, 2 video) where the
    installed transformers' forward takes it.
    """
    config = model.config
    merge = config.vision_config.spatial_merge_size**2
    token = config.video_token_id if video else config.image_token_id
    ids: list[int] = [3 + i for i in range(text_len)]
    for t, h, w in grid_thw:
        ids += [config.vision_start_token_id, *[token] * (t * h * w // merge), config.vision_end_token_id]
    ids += [10 + i for i in range(text_len)]
    input_ids = torch.tensor([ids])
    pixels, grid = sample_pixels(config.vision_config, grid_thw, dtype=model.dtype, seed=seed)
    prefix = "video" if video else "image"
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos" if video else "pixel_values": pixels,
        f"{prefix}_grid_thw": grid,
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (input_ids == token).long() * (2 if video else 1)
    return inputs
