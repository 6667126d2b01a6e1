"""How the tools call a vision tower of each kind: its cases, inputs, call and FLOP model.

Five call conventions cover every call kind of the family table (``ipcv_kernels.families``),
chosen by the row's ``kind`` (``tower_calls``); FLOPs come from the row's FLOP model
(``Family.flops``):

- ``GridCalls`` (kinds ``grid`` and ``windows``: the Qwen towers): packed patches ``[N, C T p^2]``
  and ``grid_thw`` rows; any image size (rounded to ``patch_size * spatial_merge_size`` as Qwen's
  processor does), batches and videos.
- ``TileCalls`` (kinds ``tiles`` and ``crops``: InternViT, CLIP, SigLIP): images ``[B, C, S, S]`` of the
  tower's fixed size ``S`` (its native resolution). A case's image is split into tiles / crops of
  ``S`` (``896x896`` on a 448 tower: 4 tiles), which form one item, as the full models group them
  (InternVL's tiles, LLaVA-NeXT's crops); the patched tower is told so with the adapter's hint
  (``tiles_per_image`` / ``sequences_per_image``, ``IPCVPatch.hinted``). Batches are several
  images; videos are refused. The output compared is ``last_hidden_state``.
- ``ImageCalls`` (kind ``images``: Pixtral / Mistral 3): images at their own resolution, padded
  to the largest, with ``image_sizes``; cases and inputs as ``GridCalls``' (``(1, h, w)`` rows).
- ``PatchCalls`` (kind ``patches``: Gemma 4): a padded batch of flattened patches ``[B, L, C p^2]``
  and their positions, each image resized into the patch budget ``L`` as Gemma 4's processor
  resizes it, the rest of its row padding.
- ``SubImageCalls`` (kind ``sub_images``: Idefics3 / SmolVLM): ``tower(pixel_values, patch_attention_mask)`` over
  sub-images of the tower's size ``S``: an ``HxW`` image is split into ``ceil(H / S) x ceil(W /
  S)`` sub-images plus, when there are several, a global one (as Idefics3's processor splits
  it), all one item; where the image ends inside a sub-image, its remaining patches are padding
  (zeros, marked in ``patch_attention_mask``). Idefics3's own processor first rounds an image up
  to multiples of ``S``, so its sub-images hold no padding: these cases exercise the padding the
  model supports (``patch_attention_mask``), as any padded batch of sub-images has it.

A ``ModelUse`` (a preset's in the family table, or read from a full checkpoint's config by
``towers.model_use``) makes ``TileCalls`` call the tower as its full model does: reading
``vision_feature_layer`` (LLaVA's -2; the blocks after it are left out of the unpatched tower for
the call, and the patched tower skips them, told the read blocks as
``get_image_features`` tells it), and counting anyres crops (LLaVA-NeXT / OneVision).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import apply_ipcv, get_ipcv_patch, remove_ipcv
from ..config import IPCVConfig
from ..engine import read_blocks
from ..families import CALL_KINDS, Family, ModelUse, family, find_family
from ..families.row import FRAMES, IMAGES, PATCHES, SLICES, SUB_IMAGES, TILES
from ..flops import FlopReport
from .towers import build_tower, load_vision_tower, model_use, preset_use, tower_output, vision_config_from_preset

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
    # Sub-image towers: (rows, columns) of real patches of every tile, in order (the rest of its
    # square grid is padding); empty: every patch real.
    tile_real: tuple[tuple[int, int], ...] = ()
    # Qwen-style towers that prepend a CLS row to every frame (CallKind.frame_cls): 1, else 0.
    frame_cls: int = 0

    @property
    def tile_padding(self) -> tuple[int, ...]:
        """Padding patches of every tile (``tile_tokens - rows * columns``; empty without ``tile_real``)."""
        return tuple(self.tile_tokens - rows * cols for rows, cols in self.tile_real)

    @property
    def tokens(self) -> int:
        """Tokens entering the tower's blocks (patches, and CLS tokens where the tower has them)."""
        frames = sum(t for t, _, _ in self.grid_thw)
        patches = sum(t * h * w for t, h, w in self.grid_thw)
        return patches + self.frame_cls * frames + sum(self.tiles_per_image) * self.tile_tokens

    @property
    def patches(self) -> int:
        """Patch rows of a ``grid_thw`` case's pixels (its tokens without CLS rows)."""
        return sum(t * h * w for t, h, w in self.grid_thw)


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


def grid_merge(vision_config: Any) -> int:
    """The spatial merge of a grid tower's config: Qwen's ``spatial_merge_size``, else MoonViT's
    (Kimi-K2.5) ``merge_kernel_size`` (its 2-D pooling window, square)."""
    merge = getattr(vision_config, "spatial_merge_size", None)
    return int(merge) if merge is not None else int(vision_config.merge_kernel_size[0])


def grid_temporal_patch(vision_config: Any) -> int:
    """Frames per patch of a grid tower's config; ``1`` for towers without temporal patches (Kimi-K2.5)."""
    return int(getattr(vision_config, "temporal_patch_size", 1))


def grid_pixel_shape(vision_config: Any) -> tuple[int, ...]:
    """One patch row of a grid tower's input: Qwen's flattened ``(C * T * p * p,)``, or
    ``(C, p, p)`` for towers without temporal patches, whose convolution takes each patch as an
    image (Kimi-K2.5, LLaVA-OneVision-1.5)."""
    c = vision_config
    if not hasattr(c, "temporal_patch_size"):
        return (getattr(c, "in_channels", 3), c.patch_size, c.patch_size)
    return (c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size,)


def parse_grid_case(text: str, vision_config: Any, *, frames_as_rows: bool = False) -> Case:
    """``"HxW"`` one image, ``"HxW*B"`` ``B`` images, ``"HxW@F"`` a video of ``F`` frames, for a
    Qwen tower: sizes in pixels, rounded to the nearest multiple of ``patch_size *
    spatial_merge_size`` (28 for Qwen2-VL); ``F`` must be a multiple of ``temporal_patch_size``.
    ``frames_as_rows``: a video is given as one ``[1, h, w]`` row per temporal patch (the ``FRAMES``
    call kind: GLM-4.1V's model calls its tower so), not as one ``[F / T, h, w]`` row."""
    height, width, batch, frames = match_case(text)
    c = vision_config
    merge, temporal = grid_merge(c), grid_temporal_patch(c)
    h = _patches(height, c.patch_size, merge)
    w = _patches(width, c.patch_size, merge)
    if frames is not None:
        if frames < 1 or frames % temporal:
            raise ValueError(f"cases: frames must be a positive multiple of {temporal}, got {text!r}")
        count = frames // temporal
        return Case(text, "video", ((1, h, w),) * count if frames_as_rows else ((count, h, w),))
    count = batch if batch is not None else 1
    if count < 1:
        raise ValueError(f"cases: batch size must be >= 1, got {text!r}")
    return Case(text, "batch" if count > 1 else "image", ((1, h, w),) * count)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


class TowerCalls:
    """The call convention of one tower: subclasses say how cases become inputs and FLOPs."""

    def __init__(self, tower: nn.Module, family: Family, use: ModelUse | None = None) -> None:
        self.tower = tower
        self.family = family
        self.config = tower.config
        self.use = use

    def reading(self) -> str | None:
        """What the full model reads of the tower, when not its whole output (for reports)."""
        return None

    @property
    def model_family(self) -> Family:
        """The family of the model using the tower (``use.family``), else the tower's own: its
        recommended setting is the one to take."""
        if self.use is None or self.use.family is None:
            return self.family
        return family(self.use.family)

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

    def switch(self, config: IPCVConfig | None) -> None:
        """Run the tower patched with ``config`` from now on (``apply_ipcv``), or unpatched for
        ``None``: how a tool moves between the variants it compares (set-up, never timed)."""
        if config is None:
            remove_ipcv(self.tower)
        else:
            apply_ipcv(self.tower, config)

    def tokens_per_block(self) -> list[int]:
        """The rows each block computed in the tower's last patched call."""
        return list(get_ipcv_patch(self.tower).last_tokens_per_block)


class GridCalls(TowerCalls):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL towers: ``tower(patches, grid_thw)``, the merger's output."""

    @property
    def depth(self) -> int:
        c = self.config
        return c.depth if hasattr(c, "depth") else c.num_hidden_layers

    @property
    def merge_unit(self) -> int:
        """Pixels per side of one merge unit (``patch_size`` times the spatial merge)."""
        return self.config.patch_size * grid_merge(self.config)

    def parse_case(self, text: str) -> Case:
        case = parse_grid_case(text, self.config, frames_as_rows=self.family.kind is FRAMES)
        return replace(case, frame_cls=int(self.family.kind.frame_cls))

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(case.patches, *grid_pixel_shape(self.config), generator=generator).to(device, dtype)
        return case, (pixels, torch.tensor(case.grid_thw, dtype=torch.int64, device=device))

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        with torch.inference_mode():
            return tower_output(self.tower(*inputs[1]))

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        return self.family.flops(self.config, case.grid_thw, config)


class TileCalls(TowerCalls):
    """InternViT / CLIP / SigLIP / Idefics3-style towers: ``tower(pixel_values [B, C, S, S])``,
    its ``last_hidden_state``; the tiles of one image form one item."""

    def __init__(self, tower: nn.Module, family: Family, use: ModelUse | None = None) -> None:
        super().__init__(tower, family, use)
        self.internvl = family.kind is TILES
        c = self.config
        self.image_size = _pair(c.image_size)
        self.patch_size = _pair(c.patch_size)
        self.cls = 1 if self.internvl else int(getattr(c, "model_type", "") == "clip_vision_model")
        self.hint = "tiles_per_image" if self.internvl else "sequences_per_image"
        # The CLS row is every tile's last (Llama 4) rather than its first.
        self.cls_last = bool(getattr(family.hf.adapter, "cls_last", False))
        self.blocks = family.hf.adapter().blocks(tower)
        # The blocks the model reads (``None``: the last one, as the tower's own output).
        layer = None if use is None else use.feature_layer
        self.read = None if layer is None else read_blocks(layer, len(self.blocks))

    @property
    def depth(self) -> int:
        return self.config.num_hidden_layers

    def reading(self) -> str | None:
        if self.read is None or self.use is None:
            return None
        last = max(self.read)
        text = (
            f"{self.use.model} reads hidden_states[{self.use.feature_layer}] (the output of block(s) "
            f"{', '.join(map(str, self.read))} of 0-{self.depth - 1})"
        )
        if last == self.depth - 1:
            return text + ": every block runs"
        one = last + 1 == self.depth - 1
        skipped = f"block {last + 1} runs" if one else f"blocks {last + 1}-{self.depth - 1} run"
        return (
            f"{text}: {skipped} neither in the unpatched tower nor with IPCV, "
            f"and the FLOP model counts blocks 0-{last} only"
        )

    @property
    def tile_tokens(self) -> int:
        (h, w), (ph, pw) = self.image_size, self.patch_size
        return (h // ph) * (w // pw) + self.cls

    def default_cases(self) -> tuple[str, ...]:
        """The model use's cases, else one image at the tower's native resolution."""
        if self.use is not None and self.use.cases is not None:
            return self.use.cases
        return (f"{self.image_size[0]}x{self.image_size[1]}",)

    def _images(self, text: str) -> tuple[int, int, int]:
        """``(height, width, images)`` of an image or batch case; videos (``@F``) are refused."""
        height, width, batch, frames = match_case(text)
        if frames is not None:
            raise ValueError(f"cases: videos ({text!r}) need a Qwen tower; {self.family.name} takes images")
        count = batch if batch is not None else 1
        if count < 1:
            raise ValueError(f"cases: batch size must be >= 1, got {text!r}")
        return height, width, count

    def parse_case(self, text: str) -> Case:
        """``"HxW"``: one image of ``round(H / S) x round(W / S)`` tiles of the tower's size ``S``
        (with anyres ``grid_pinpoints``: the model's crop count of an ``H x W`` image, base crop
        included); ``"HxW*B"``: ``B`` such images; videos (``@F``) are refused."""
        height, width, count = self._images(text)
        pinpoints = None if self.use is None else self.use.grid_pinpoints
        if pinpoints is not None:
            module = importlib.import_module(f"transformers.models.{self.use.anyres_module}")
            tiles = int(
                module.image_size_to_num_patches(
                    image_size=(height, width),
                    grid_pinpoints=[list(p) for p in pinpoints],
                    patch_size=self.image_size[0],
                )
            )
        else:
            tiles = max(1, round(height / self.image_size[0])) * max(1, round(width / self.image_size[1]))
        return Case(text, "batch" if count > 1 else "image", (), (tiles,) * count, self.tile_tokens)

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        generator = torch.Generator().manual_seed(seed)
        channels = getattr(self.config, "num_channels", 3)
        shape = (sum(case.tiles_per_image), channels, *self.image_size)
        return case, (torch.randn(shape, generator=generator).to(device, dtype),)

    @contextlib.contextmanager
    def _grouped(self, case: Case) -> Iterator[None]:
        """The call as the full model makes it: a patched tower is told its items (and read
        blocks); an unpatched one runs without the blocks after the last read one."""
        patch = get_ipcv_patch(self.tower)
        if patch is not None:
            hints: dict[str, Any] = {self.hint: list(case.tiles_per_image)}
            if self.read is not None:
                hints["read_blocks"] = self.read
            with patch.hinted(**hints):
                yield
            return
        if self.read is None:
            yield
            return
        # Left out of the module list for this call only (the benchmark is single-threaded):
        # the tower's own loop then runs exactly the blocks the model's feature layer needs.
        last = max(self.read)
        skipped = list(self.blocks[last + 1 :])
        del self.blocks[last + 1 :]
        try:
            yield
        finally:
            self.blocks.extend(skipped)

    def _call(self, inputs: tuple[Case, tuple]) -> tuple[torch.Tensor, ...]:
        """The tower's arguments of ``inputs``."""
        return inputs[1]

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        """``last_hidden_state``; with read blocks, the read ``hidden_states`` concatenated along
        the features, as LLaVA concatenates a list of feature layers."""
        case = inputs[0]
        with torch.inference_mode(), self._grouped(case):
            if self.read is None:
                return self.tower(*self._call(inputs)).last_hidden_state
            # Counted from the front: the unpatched call's hidden_states stop at its last block.
            states = self.tower(*self._call(inputs), output_hidden_states=True).hidden_states
            return torch.cat([states[block + 1] for block in self.read], -1)

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        return self.family.flops(self.config, case.tiles_per_image, config, read_blocks=self.read)


class SubImageCalls(TileCalls):
    """Idefics3 / SmolVLM towers: ``tower(pixel_values [N, C, S, S], patch_attention_mask
    [N, S/p, S/p])`` over the sub-images of every image (see the module docstring)."""

    def parse_case(self, text: str) -> Case:
        """``"HxW"``: one image split into ``ceil(H / S) x ceil(W / S)`` sub-images of the tower's
        size ``S``, plus a global sub-image when there are several; the patches past the image's
        edge are padding (a patch is real where any of its pixels is, as the model counts them).
        ``"HxW*B"``: ``B`` such images. Videos (``@F``) are refused."""
        height, width, count = self._images(text)
        (size, _), (patch, _) = self.image_size, self.patch_size
        grid = size // patch
        rows, cols = math.ceil(height / size), math.ceil(width / size)
        real = [
            (math.ceil(min(size, height - r * size) / patch), math.ceil(min(size, width - c * size) / patch))
            for r in range(rows)
            for c in range(cols)
        ]
        if len(real) > 1:
            real.append((grid, grid))  # the global image, the whole image resized to S x S
        tiles = len(real)
        return Case(text, "batch" if count > 1 else "image", (), (tiles,) * count, grid * grid, tuple(real) * count)

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        """Random sub-images, zero in their padding patches, and the patch mask (``True``: real)."""
        (_, (pixels,)) = super().inputs(case, seed, device, dtype)
        grid = self.image_size[0] // self.patch_size[0]
        mask = torch.zeros(len(case.tile_real), grid, grid, dtype=torch.bool, device=device)
        for tile, (rows, cols) in enumerate(case.tile_real):
            mask[tile, :rows, :cols] = True
        pixel_mask = mask.repeat_interleave(self.patch_size[0], 1).repeat_interleave(self.patch_size[1], 2)
        return case, (pixels * pixel_mask.unsqueeze(1).to(dtype), mask)

    def _call(self, inputs: tuple[Case, tuple]) -> tuple[torch.Tensor, ...]:
        pixels, mask = inputs[1]
        return (pixels, mask)

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        padding = case.tile_padding
        per_image, start = [], 0
        for tiles in case.tiles_per_image:
            per_image.append(list(padding[start : start + tiles]))
            start += tiles
        return self.family.flops(self.config, per_image, config)


# Gemma 4's processors: ``max_soft_tokens`` by default (the pooled tokens per image; the patch
# budget is that times ``pooling_kernel_size ** 2``), where the config names no
# ``default_output_length``.
GEMMA4_SOFT_TOKENS = 280


class PatchCalls(TowerCalls):
    """Gemma 4 towers: ``tower(pixel_values [B, L, C p^2], pixel_position_ids [B, L, 2])``, the
    pooled soft tokens of every image (padding dropped), each image one item.

    ``L`` is the patch budget, ``default_output_length`` (else ``GEMMA4_SOFT_TOKENS``) soft tokens
    of ``k x k`` patches: an ``HxW`` image is resized as Gemma 4's processor resizes it (aspect
    kept, the largest size within the budget whose sides are multiples of ``k p``), its patches
    fill the first rows of its batch row and the rest are padding (zeros, position ``-1``).
    """

    def __init__(self, tower: nn.Module, family: Family, use: ModelUse | None = None) -> None:
        super().__init__(tower, family, use)
        c = self.config
        self.patch = int(c.patch_size)
        self.pool = int(c.pooling_kernel_size)
        soft_tokens = getattr(c, "default_output_length", None) or GEMMA4_SOFT_TOKENS
        self.max_patches = int(soft_tokens) * self.pool * self.pool

    @property
    def depth(self) -> int:
        return self.config.num_hidden_layers

    def default_cases(self) -> tuple[str, ...]:
        """One square image filling the budget."""
        side = math.isqrt(self.max_patches // (self.pool * self.pool)) * self.pool * self.patch
        return (f"{side}x{side}",)

    def parse_case(self, text: str) -> Case:
        """``"HxW"``: one image resized into the patch budget as Gemma 4's processor does;
        ``"HxW*B"``: ``B`` such images; videos (``@F``) are refused."""
        height, width, batch, frames = match_case(text)
        if frames is not None:
            raise ValueError(f"cases: videos ({text!r}) need a Qwen tower; {self.family.name} takes images")
        count = batch if batch is not None else 1
        if count < 1:
            raise ValueError(f"cases: batch size must be >= 1, got {text!r}")
        module = importlib.import_module("transformers.models.gemma4.image_processing_pil_gemma4")
        resized = module.get_aspect_ratio_preserving_size(height, width, self.patch, self.max_patches, self.pool)
        real = (resized[0] // self.patch, resized[1] // self.patch)
        kind = "batch" if count > 1 else "image"
        return Case(text, kind, (), (1,) * count, self.max_patches, (real,) * count)

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        """Random patches in ``[0, 1]`` (zero on padding) and their ``(x, y)`` positions (``-1`` on padding)."""
        generator = torch.Generator().manual_seed(seed)
        images = len(case.tile_real)
        pixels = torch.zeros(images, self.max_patches, 3 * self.patch * self.patch)
        positions = torch.full((images, self.max_patches, 2), -1, dtype=torch.int64)
        for image, (rows, cols) in enumerate(case.tile_real):
            pixels[image, : rows * cols] = torch.rand(rows * cols, pixels.shape[-1], generator=generator)
            y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            positions[image, : rows * cols] = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)
        return case, (pixels.to(device, dtype), positions.to(device))

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        with torch.inference_mode():
            return self.tower(*inputs[1]).last_hidden_state

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        shape = [(case.tile_tokens, rows * cols) for rows, cols in case.tile_real]
        return self.family.flops(self.config, shape, config)


class ImageCalls(GridCalls):
    """Pixtral towers (kind ``images``): ``tower(pixel_values [B, C, H, W], image_sizes [B, 2])``,
    every image at its own resolution (the batch zero-padded to the largest), its
    ``last_hidden_state`` rows ``[n, D]``.

    Cases are ``grid_thw`` rows ``(1, h, w)`` in patches, as for the Qwen towers, with each side
    rounded to a multiple of ``2 * patch_size`` (Mistral 3's processor rounds to ``patch_size *
    spatial_merge_size``, 2 x 2 merged after the tower); videos are refused. The inputs are the
    images' patches, packed (``[N, C p^2]``, each image's patches row-major) with their
    ``grid_thw``, so that a batch splits into its images as a Qwen call does; ``forward`` lays
    them out as the images the tower takes.
    """

    MERGE = 2

    def __init__(self, tower: nn.Module, family: Family, use: ModelUse | None = None) -> None:
        super().__init__(tower, family, use)
        self.blocks = family.hf.adapter().blocks(tower)
        # The blocks the model reads (``vision_feature_layer``; ``None``: the last one).
        layer = None if use is None else use.feature_layer
        self.read = None if layer is None else read_blocks(layer, len(self.blocks))

    reading = TileCalls.reading

    @property
    def depth(self) -> int:
        return self.config.num_hidden_layers

    @property
    def merge_unit(self) -> int:
        return self.config.patch_size * self.MERGE

    def parse_case(self, text: str) -> Case:
        """``"HxW"`` one image, ``"HxW*B"`` ``B`` images; sizes rounded to ``merge_unit`` pixels."""
        height, width, batch, frames = match_case(text)
        if frames is not None:
            raise ValueError(f"cases: videos ({text!r}) need a Qwen tower; {self.family.name} takes images")
        count = batch if batch is not None else 1
        if count < 1:
            raise ValueError(f"cases: batch size must be >= 1, got {text!r}")
        patch = self.config.patch_size
        rows, cols = _patches(height, patch, self.MERGE), _patches(width, patch, self.MERGE)
        return Case(text, "batch" if count > 1 else "image", ((1, rows, cols),) * count)

    def inputs(self, case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Case, tuple]:
        c = self.config
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(case.tokens, c.num_channels * c.patch_size * c.patch_size, generator=generator)
        return case, (pixels.to(device, dtype), torch.tensor(case.grid_thw, dtype=torch.int64, device=device))

    def images(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values [B, C, H, W], image_sizes [B, 2])`` of packed patches and their grid."""
        c, p = self.config, self.config.patch_size
        rows_cols = [(int(h), int(w)) for _, h, w in grid_thw.tolist()]
        height, width = max(h for h, _ in rows_cols) * p, max(w for _, w in rows_cols) * p
        pixel_values = patches.new_zeros(len(rows_cols), c.num_channels, height, width)
        for i, (part, (h, w)) in enumerate(zip(patches.split([h * w for h, w in rows_cols]), rows_cols, strict=True)):
            image = part.view(h, w, c.num_channels, p, p).permute(2, 0, 3, 1, 4).reshape(c.num_channels, h * p, w * p)
            pixel_values[i, :, : h * p, : w * p] = image
        sizes = torch.tensor([[h * p, w * p] for h, w in rows_cols], dtype=torch.int64, device=patches.device)
        return pixel_values, sizes

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The call as the full model makes it: a patched tower is told the blocks read; an
        unpatched one runs without the blocks after the last of them."""
        patch = get_ipcv_patch(self.tower)
        if self.read is None:
            yield
        elif patch is not None:
            with patch.hinted(read_blocks=self.read):
                yield
        else:  # left out for this call only (the benchmark is single-threaded)
            skipped = list(self.blocks[max(self.read) + 1 :])
            del self.blocks[max(self.read) + 1 :]
            try:
                yield
            finally:
                self.blocks.extend(skipped)

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        """``last_hidden_state`` rows ``[n, D]``; with read blocks, the read ``hidden_states``
        concatenated along the features (as Mistral 3 concatenates a list of feature layers)."""
        pixel_values, image_sizes = self.images(*inputs[1])
        with torch.inference_mode(), self._reading():
            if self.read is None:
                hidden = self.tower(pixel_values, image_sizes=image_sizes).last_hidden_state
            else:
                states = self.tower(pixel_values, image_sizes=image_sizes, output_hidden_states=True).hidden_states
                hidden = torch.cat([states[block + 1] for block in self.read], -1)
        return hidden.reshape(-1, hidden.shape[-1])

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        return self.family.flops(self.config, case.grid_thw, config, read_blocks=self.read)


class SliceCalls(ImageCalls):
    """MiniCPM-V towers (kind ``slices``): ``tower(pixel_values [1, C, p, n p], target_sizes [S, 2])``,
    every slice at its own size, packed as the model's processor packs them; the tower's
    ``last_hidden_state`` rows ``[n / 4, D]`` (2 x 2 merged inside it).

    Cases are ``grid_thw`` rows ``(1, h, w)`` in patches, one per slice, each side rounded to a
    multiple of ``4 * patch_size`` (the tower's merge and the model's ``Merger`` after it each take
    2 x 2); the inputs are the slices' patches ``[N, C p^2]`` with their ``grid_thw``, as for
    ``ImageCalls``.
    """

    MERGE = 4

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        patches, grid_thw = inputs[1]
        c, p = self.config, self.config.patch_size
        # Patch j of the packed sequence is pixel_values[0, :, :, j p : (j + 1) p].
        pixel_values = patches.view(-1, c.num_channels, p, p).permute(1, 2, 0, 3).reshape(1, c.num_channels, p, -1)
        target_sizes = grid_thw[:, 1:].to(torch.int32)
        with torch.inference_mode():
            hidden = self.tower(pixel_values, target_sizes=target_sizes).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])

    def flops(self, case: Case, config: IPCVConfig | None) -> FlopReport:
        return self.family.flops(self.config, case.grid_thw, config)


def tower_calls(tower: nn.Module, use: ModelUse | None = None) -> TowerCalls:
    """The call convention of ``tower``'s call kind (its row in the family table): ``GridCalls``
    for towers that take ``grid_thw``, ``SubImageCalls`` for sub-images, ``TileCalls`` for tiles
    and crops; ``use`` (a tile tower's) says how its full model calls it.

    Raises:
        TypeError: ``tower`` is of no supported family, or a full model.
        ValueError: a ``use`` with a feature layer or anyres crops for a grid or sub-image tower.
    """
    row, found = find_family(tower)
    if found is not tower:
        raise TypeError(f"the benchmark times a vision tower, got a full {row.name} model")
    reshaped = use is not None and (use.feature_layer is not None or use.grid_pinpoints is not None)
    calls = KIND_CALLS[row.kind.name]
    if reshaped and calls is not TileCalls and not (calls is ImageCalls and use.grid_pinpoints is None):
        raise ValueError(f"use: {row.name} towers ({row.kind.items}) take no feature layer or anyres crops, got {use}")
    return calls(tower, row, use)


# Every call kind of the family table, and the convention that calls its towers.
KIND_CALLS: dict[str, type[TowerCalls]] = {
    kind.name: GridCalls
    if kind.takes_grid_thw
    else SubImageCalls
    if kind is SUB_IMAGES
    else PatchCalls
    if kind is PATCHES
    else ImageCalls
    if kind is IMAGES
    else SliceCalls
    if kind is SLICES
    else TileCalls
    for kind in CALL_KINDS
}


def load_calls(
    model: str | Path | None,
    preset: str | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> TowerCalls:
    """The tower a tool times, called as its full model calls it.

    Args:
        model: a local checkpoint directory: its vision tower with its own weights
            (``towers.load_vision_tower``), called as ``towers.model_use`` reads from its config.
        preset: else, a preset of the family table: its tower with ``seed``-ed random weights,
            called as the preset's ``ModelUse`` says (a bare tower call without one).
    """
    if model is not None:
        use = model_use(model)
        tower = load_vision_tower(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
    elif preset is not None:
        use = preset_use(preset)
        tower = build_tower(
            vision_config_from_preset(preset, attn_implementation), dtype=dtype, device=device, seed=seed
        )
    else:
        raise ValueError("load_calls: give a model directory or a preset name")
    return tower_calls(tower, use)
