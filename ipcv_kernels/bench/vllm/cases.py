"""What bench-vllm runs: its presets, cases and IPCV setting, from the family table and the command line."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from ...config import IPCVConfig
from ...families import Family, presets
from ...vllm.testing import CHECKPOINTS
from ..calls import Case, parse_grid_case
from ..towers import vision_config_from_preset

VARIANTS = ("unpatched", "ipcv")


MEASURES = ("encoder", "ttft")


# The presets whose family's tiny vLLM checkpoint takes another tower shape (``build_checkpoint``'s
# ``vision``); a preset of another row's tower (LLaVA's CLIP) has none.
PRESETS = tuple(name for name, (row, preset) in presets().items() if row.id in CHECKPOINTS and preset.tower is None)


DEFAULT_PRESET = "qwen2-vl-7b-d8"


# 448 x 896 pixels: 32 x 64 patches, 2,048 tokens per image.
DEFAULT_CASES = ("448x896",)


PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7"


# Text tokens of PROMPT besides the image's placeholders, with room to spare, for max_model_len.
PROMPT_MARGIN = 16


def parse_image_case(text: str, vision_config: Any) -> Case:
    """One image of ``HxW`` pixels (``calls.parse_grid_case``); batches and videos are refused,
    since each request of the benchmark carries one image."""
    case = parse_grid_case(text, vision_config)
    if case.kind != "image":
        raise ValueError(f"cases: bench-vllm takes one image per case ('HxW'), got {text!r}")
    return case


def case_pixels(case: Case, vision_config: Any) -> tuple[int, int]:
    """``(height, width)`` in pixels of the case's image: its grid times the patch size, which
    Qwen2-VL's processor keeps as it is (a multiple of ``patch_size * spatial_merge_size``)."""
    ((_, h, w),) = case.grid_thw
    return h * vision_config.patch_size, w * vision_config.patch_size


def merged_tokens(case: Case, vision_config: Any) -> int:
    """Placeholder tokens of the case's image in the prompt (after the ``merge x merge`` merger)."""
    return case.tokens // vision_config.spatial_merge_size**2


def preset_family(preset: str) -> Family:
    """The family-table row of a ``PRESETS`` name."""
    return presets()[preset][0]


def bench_vision_config(preset: str) -> Any:
    """The vision config of the benchmark's tower: the preset's, with the merger's output width the
    tiny language model's (``ipcv_kernels.vllm.testing.VLLM_TEXT``)."""
    from ...vllm.testing import VLLM_TEXT

    vision_config = vision_config_from_preset(preset)
    setattr(vision_config, CHECKPOINTS[preset_family(preset).id][3], VLLM_TEXT["hidden_size"])
    return vision_config


IPCV_FLAGS = ("ratio", "prune_layer", "as_layers", "neighbors")


def explicit_ipcv_flags(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in IPCV_FLAGS)


def ipcv_from_args(args: argparse.Namespace) -> IPCVConfig:
    """The preset's family's recommended setting (its row in the family table), with the IPCV
    flags that are given applied."""
    base = IPCVConfig(**preset_family(args.preset).recommended)
    return replace(
        base,
        ratio=args.ratio if args.ratio is not None else base.ratio,
        prune_layer=args.prune_layer if args.prune_layer is not None else base.prune_layer,
        as_layers=args.as_layers if args.as_layers is not None else base.as_layers,
        num_neighbors=args.neighbors if args.neighbors is not None else base.num_neighbors,
    )
