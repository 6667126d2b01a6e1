"""How the benchmarks call a vision tower of each kind: its cases, inputs, call and FLOP model.

Two call conventions cover every family of the family table (``ipcv_kernels.models.families``),
chosen by the family's adapter (``tower_calls``):

- ``GridCalls`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): packed patches ``[N, C T p^2]`` and ``grid_thw``
  rows; any image size (rounded to ``patch_size * spatial_merge_size`` as Qwen's processor does),
  batches and videos; FLOPs from ``flops.vision_tower_flops``.
- ``TileCalls`` (InternViT, CLIP, SigLIP, Idefics3 / SmolVLM): images ``[B, C, S, S]`` of the
  tower's fixed size ``S`` (its native resolution). A case's image is split into tiles / crops of
  ``S`` (``896x896`` on a 448 tower: 4 tiles), which form one item, as the full models group them
  (InternVL's tiles, LLaVA-NeXT's crops); the patched tower is told so with the adapter's hint
  (``tiles_per_image`` / ``sequences_per_image``, ``IPCVPatch.hinted``). Batches are several
  images; videos are refused. FLOPs from ``flops.internvl_flops`` (CLS pinned) or
  ``flops.clip_vit_flops`` (CLIP's CLS pinned, SigLIP has none). The output compared is
  ``last_hidden_state``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..flops import FlopReport, clip_vit_flops, internvl_flops, vision_tower_flops
from ..models import get_ipcv_patch
from ..models.families import Family, find_family
from ..models.internvl import InternVLAdapter
from .towers import tower_output

CASE = re.compile(r"^(\d+)x(\d+)(?:\*(\d+)|@(\d+))?$")
CASE_FORMS = "'HxW', 'HxW*B' or 'HxW@F'"


@dataclass(frozen=True)
class Case:
    """One input: ``grid_thw`` rows (``t, h, w`` in patches) for a Qwen tower, or the tiles of
    every image (``tiles_per_image``, each of ``tile_tokens`` rows, CLS included) for a tile tower."""

    name: str
    kind: str  # "image", "batch" or "video"
    grid_thw: tuple[tuple[int, int, int], ...] = ()
    tiles_per_image: tuple[int, ...] = ()
    tile_tokens: int = 0

    @property
    def tokens(self) -> int:
        """Tokens entering the tower's blocks (patches, and CLS tokens where the tower has them)."""
        return sum(t * h * w for t, h, w in self.grid_thw) + sum(self.tiles_per_image) * self.tile_tokens


def match_case(text: Any) -> tuple[int, int, int | None, int | None]:
    """``(height, width, batch or None, frames or None)`` of a case's text."""
    match = CASE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"cases: expected {CASE_FORMS}, got {text!r}")
    height, width, batch, frames = match.groups()
    return int(height), int(width), None if batch is None else int(batch), None if frames is None else int(frames)


def _patches(pixels: int, patch: int, merge: int) -> int:
    # Like Qwen2-VL's processor (``smart_resize``): round to the nearest multiple of patch * merge.
    unit = patch * merge
    return max(1, round(pixels / unit)) * merge


def parse_grid_case(text: str, vision_config: Any) -> Case:
    """``"HxW"`` one image, ``"HxW*B"`` ``B`` images, ``"HxW@F"`` a video of ``F`` frames, for a
    Qwen tower: sizes in pixels, rounded to the nearest multiple of ``patch_size *
    spatial_merge_size`` (28 for Qwen2-VL); ``F`` must be a multiple of ``temporal_patch_size``."""
    height, width, batch, frames = match_case(text)
    c = vision_config
    h = _patches(height, c.patch_size, c.spatial_merge_size)
    w = _patches(width, c.patch_size, c.spatial_merge_size)
    if frames is not None:
        if frames < 1 or frames % c.temporal_patch_size:
            raise ValueError(f"cases: frames must be a positive multiple of {c.temporal_patch_size}, got {text!r}")
        return Case(text, "video", ((frames // c.temporal_patch_size, h, w),))
    count = batch if batch is not None else 1
    if count < 1:
        raise ValueError(f"cases: batch size must be >= 1, got {text!r}")
    return Case(text, "batch" if count > 1 else "image", ((1, h, w),) * count)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


class TowerCalls:
    """The call convention of one tower: subclasses say how cases become inputs and FLOPs."""

    def __init__(self, tower: nn.Module, family: Family) -> None:
        self.tower = tower
        self.family = family
        self.config = tower.config

    @property
    def depth(self) -> int:
        """Blocks of the tower."""
        raise NotImplementedError

    def parse_case(self, text: str) -> Case:
        raise NotImplementedError

    def default_cases(self) -> tuple[str, ...] | None:
        """Cases when none are given (``None``: the suite's)."""
        return None

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        """Seeded random inputs of ``case`` on ``device`` in ``dtype``, for ``forward``."""
        raise NotImplementedError

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        """One inference call of the tower as it is patched now; the output compared."""
        raise NotImplementedError

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        """The FLOP model of one call (``config=None``: unpatched)."""
        raise NotImplementedError


class GridCalls(TowerCalls):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL towers: ``tower(patches, grid_thw)``, the merger's output."""

    @property
    def depth(self) -> int:
        return self.config.depth

    def parse_case(self, text: str) -> Case:
        return parse_grid_case(text, self.config)

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        c = self.config
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(case.tokens, patch_dim, generator=generator).to(device, dtype)
        return case, (pixels, torch.tensor(case.grid_thw, dtype=torch.int64, device=device))

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        with torch.inference_mode():
            return tower_output(self.tower(*inputs[1]))

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        return vision_tower_flops(self.config, case.grid_thw, config)


class TileCalls(TowerCalls):
    """InternViT / CLIP / SigLIP / Idefics3-style towers: ``tower(pixel_values [B, C, S, S])``,
    its ``last_hidden_state``; the tiles of one image form one item."""

    def __init__(self, tower: nn.Module, family: Family) -> None:
        super().__init__(tower, family)
        self.internvl = issubclass(family.adapter, InternVLAdapter)
        c = self.config
        self.image_size = _pair(c.image_size)
        self.patch_size = _pair(c.patch_size)
        self.cls = 1 if self.internvl else int(getattr(c, "model_type", "") == "clip_vision_model")
        self.hint = "tiles_per_image" if self.internvl else "sequences_per_image"

    @property
    def depth(self) -> int:
        return self.config.num_hidden_layers

    @property
    def tile_tokens(self) -> int:
        (h, w), (ph, pw) = self.image_size, self.patch_size
        return (h // ph) * (w // pw) + self.cls

    def default_cases(self) -> tuple[str, ...]:
        """One image at the tower's native resolution."""
        return (f"{self.image_size[0]}x{self.image_size[1]}",)

    def parse_case(self, text: str) -> Case:
        """``"HxW"``: one image of ``round(H / S) x round(W / S)`` tiles of the tower's size ``S``;
        ``"HxW*B"``: ``B`` such images; videos (``@F``) are refused."""
        height, width, batch, frames = match_case(text)
        if frames is not None:
            raise ValueError(f"cases: videos ({text!r}) need a Qwen tower; {self.family.name} takes images")
        count = batch if batch is not None else 1
        if count < 1:
            raise ValueError(f"cases: batch size must be >= 1, got {text!r}")
        tiles = max(1, round(height / self.image_size[0])) * max(1, round(width / self.image_size[1]))
        return Case(text, "batch" if count > 1 else "image", (), (tiles,) * count, self.tile_tokens)

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        generator = torch.Generator().manual_seed(seed)
        channels = getattr(self.config, "num_channels", 3)
        shape = (sum(case.tiles_per_image), channels, *self.image_size)
        return case, (torch.randn(shape, generator=generator).to(device, dtype),)

    @contextlib.contextmanager
    def _grouped(self, case: Case) -> Iterator[None]:
        patch = get_ipcv_patch(self.tower)
        if patch is None:
            yield
            return
        with patch.hinted(**{self.hint: list(case.tiles_per_image)}):
            yield

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        case, (pixels,) = inputs
        with torch.inference_mode(), self._grouped(case):
            return self.tower(pixels).last_hidden_state

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        if self.internvl:
            return internvl_flops(self.config, case.tiles_per_image, self.image_size, config)
        return clip_vit_flops(self.config, case.tiles_per_image, config)


def tower_calls(tower: nn.Module) -> TowerCalls:
    """The call convention of ``tower``'s family (``find_family``): towers that take ``grid_thw``
    (the Qwen families) get ``GridCalls``, the others ``TileCalls``.

    Raises:
        TypeError: ``tower`` is of no supported family.
    """
    import inspect

    family, found = find_family(tower)
    if found is not tower:
        raise TypeError(f"the benchmark times a vision tower, got a full {family.name} model")
    takes_grid = "grid_thw" in inspect.signature(tower.forward).parameters
    return (GridCalls if takes_grid else TileCalls)(tower, family)
