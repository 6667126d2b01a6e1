"""What bench-vllm runs: its model (a preset or a row's tiny checkpoint), cases and IPCV setting, from the family table and the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

from ...config import IPCVConfig
from ...families import FAMILIES, Family, family, presets
from ...vllm.testing import CHECKPOINTS, SIZED_FAMILIES
from ...vllm.testing import FAMILIES as CHECKPOINT_FAMILIES
from ..calls import Case, match_case, parse_grid_case
from ..towers import vision_config_from_preset

VARIANTS = ("unpatched", "ipcv")


MEASURES = ("encoder", "ttft")


# Every row with a vLLM entry and a tiny vLLM checkpoint (``ipcv_kernels.vllm.testing``): ``--family``
# benchmarks that checkpoint as it is, whatever the row's call kind. A row transformers has no
# classes of (a remote-code format) has no reference to check against nor tower to count FLOPs
# of: it is left out (InternVL's own format: its weights in transformers' format are the
# ``internvl`` checkpoint of the same seed).
VLLM_FAMILIES = tuple(
    row.id for row in FAMILIES if row.vllm is not None and row.hf is not None and row.id in CHECKPOINT_FAMILIES
)


# The presets of those rows (``--preset``): the row's tiny vLLM checkpoint with the preset's tower
# shape and a processor of its size (``build_checkpoint``'s ``preset``; every such row's
# checkpoint takes one, ``SIZED_FAMILIES``).
PRESETS = tuple(name for name, (row, _) in presets().items() if row.id in VLLM_FAMILIES and row.id in SIZED_FAMILIES)


DEFAULT_PRESET = "qwen2-vl-7b-d8"


# 448 x 896 pixels: 32 x 64 patches, 2,048 tokens per image for a Qwen-shaped preset.
DEFAULT_CASES = ("448x896",)


# The request's text around the model's own placeholder of one image (vLLM's ``get_dummy_text``).
PROMPT = "what is {image} ?"


# Text tokens of PROMPT besides the image's placeholders, with room to spare, for max_model_len.
PROMPT_MARGIN = 16


@dataclass(frozen=True)
class Target:
    """What bench-vllm benchmarks: a family-table row's tiny vLLM checkpoint, its tower shaped as
    ``preset`` (``vision``: the preset's config fields, a Qwen merger's output width left to the
    tiny language model) with a processor of its size, or, without a preset, as the row's tiny
    checkpoint has it."""

    row: Family
    preset: str | None
    vision: dict[str, Any] | None

    @property
    def name(self) -> str:
        """The model's name in reports: the preset, or ``<row id> (tiny)``."""
        return self.preset if self.preset is not None else f"{self.row.id} (tiny)"


def target_from_args(args: argparse.Namespace) -> Target:
    """``--family`` (a row's tiny checkpoint) or ``--preset`` (default ``DEFAULT_PRESET``).

    Raises:
        ValueError: a name the list of its flag does not hold.
    """
    name = getattr(args, "family", None)
    if name is not None:  # the parser keeps --preset and --family exclusive
        if name not in VLLM_FAMILIES:
            raise ValueError(f"family must be one of {VLLM_FAMILIES}, got {name!r}")
        return Target(family(name), None, None)
    preset = args.preset if getattr(args, "preset", None) is not None else DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    row, entry = presets()[preset]
    output = CHECKPOINTS[row.id][3] if row.id in CHECKPOINTS else None
    return Target(row, preset, {k: v for k, v in entry.vision.items() if k != output})


def image_pixels(text: str, takes_grid_thw: bool, vision_config: Any | None) -> tuple[int, int]:
    """``(height, width)`` in pixels of a case's one image, ``HxW``; batches and videos are
    refused, since each request of the benchmark carries one image.

    A tower that takes ``grid_thw`` gets the size rounded as Qwen2-VL's processor rounds it
    (``calls.parse_grid_case``: multiples of ``patch_size * spatial_merge_size``, kept as they are by
    the processor); other towers get the image as given and their processor crops or tiles it.
    """
    height, width, batch, frames = match_case(text)
    if batch is not None or frames is not None:
        raise ValueError(f"cases: bench-vllm takes one image per case ('HxW'), got {text!r}")
    if not takes_grid_thw:
        return height, width
    ((_, h, w),) = parse_grid_case(text, vision_config).grid_thw
    return h * vision_config.patch_size, w * vision_config.patch_size


def parse_image_case(text: str, vision_config: Any) -> Case:
    """One image of ``HxW`` pixels for a tower that takes ``grid_thw`` (``calls.parse_grid_case``);
    batches and videos are refused, since each request of the benchmark carries one image."""
    image_pixels(text, True, vision_config)
    return parse_grid_case(text, vision_config)


def bench_vision_config(preset: str) -> Any:
    """The vision config of a preset's tower in the benchmark (``preset_vision_config``)."""
    return preset_vision_config(target_from_args(argparse.Namespace(preset=preset, family=None)))


def preset_vision_config(target: Target) -> Any | None:
    """The vision config of a preset target's tower that takes ``grid_thw`` (``None`` for a tiny
    checkpoint's or another call kind's, whose processor sizes its images itself): the target's
    fields, with the merger's output width the tiny language model's
    (``ipcv_kernels.vllm.testing.CHECKPOINTS``)."""
    if target.preset is None or not target.row.kind.takes_grid_thw:
        return None
    vision_config = vision_config_from_preset(target.preset)
    for key, value in target.vision.items():  # the target's fields (a test's reduced tower)
        setattr(vision_config, key, value)
    if target.row.id in CHECKPOINTS:  # a Qwen merger's output width (Kimi-K2.5's projector is not the tower's)
        _, text, _, output = CHECKPOINTS[target.row.id]
        setattr(vision_config, output, text["hidden_size"])
    return vision_config


IPCV_FLAGS = ("ratio", "prune_layer", "as_layers", "neighbors")


def explicit_ipcv_flags(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in IPCV_FLAGS)


def ipcv_from_args(args: argparse.Namespace, row: Family | None = None) -> IPCVConfig:
    """The recommended setting of ``row`` (default: the benchmarked row, ``target_from_args``),
    with the IPCV flags that are given applied."""
    row = target_from_args(args).row if row is None else row
    base = IPCVConfig(**row.recommended)
    return replace(
        base,
        ratio=args.ratio if args.ratio is not None else base.ratio,
        prune_layer=args.prune_layer if args.prune_layer is not None else base.prune_layer,
        as_layers=args.as_layers if args.as_layers is not None else base.as_layers,
        num_neighbors=args.neighbors if args.neighbors is not None else base.num_neighbors,
    )
