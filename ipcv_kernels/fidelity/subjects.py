"""What a fidelity run measures: a vision tower of a supported family and the samples fed to it.

A ``Subject`` is a tower (a built-in tiny random one, ``PRESETS``, or the tower of a local
checkpoint found through the family table) and its ``Sample``s: one tower call per image or
video, so that per-image statistics (mean, worst) come straight from per-call outputs.

Images (``--images DIR`` or the built-in synthetic ones) are scaled so that their longer side is
``image_size`` pixels and go through an image processor: the checkpoint's own for ``--model``, or,
for presets, the family's (``Family.image_processor`` of its row in the family table) configured
with the tiny tower's patch sizes. Videos (the families whose call kind takes them: the Qwen
towers; InternVL takes video frames as images) are laid
out here as the Qwen processors lay them out, with the processor's patch sizes and normalisation:
no video-decoding library is needed. A video is a sub-directory of ``--images DIR`` holding its
frames (name order), or the built-in synthetic one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..families import FAMILIES, Family, build_tower, find_family
from ..families.row import IMAGES, PATCHES, SLICES, SUB_IMAGES, TILES

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class FidelityError(ValueError):
    """Bad input to a fidelity run; the message names the command-line flag at fault."""


# -- presets ----------------------------------------------------------------------------------------
# Built-in towers: the tiny tower of every row of the family table that has one, with its image
# processor (``ipcv_kernels.testing``: seeded random weights), named after the family
# (``qwen2.5-vl-tiny``).
PRESETS: dict[str, Family] = {
    f"{row.name.lower().replace(' ', '-')}-tiny": row
    for row in FAMILIES
    if row.tiny_tower is not None and row.image_processor is not None
}
DEFAULT_PRESET = "qwen2-vl-tiny"
# Longer image side in pixels when ``image_size`` is not given: 16 x 16 patches of the presets'
# 2-pixel patches (256 tokens, two InternVL tiles across); a usual resolution for checkpoints.
PRESET_IMAGE_SIZE = 32
CHECKPOINT_IMAGE_SIZE = 448


# -- samples ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One tower call.

    name: the image file, directory (video) or synthetic picture it came from.
    kind: ``"image"`` or ``"video"``.
    pixels: what the tower's forward takes first: Qwen ``[n, C * T * p * p]`` flattened patches,
        InternVL / CLIP / SigLIP ``[tiles or crops, C, H, W]``.
    grid_thw: Qwen families: int64 ``[1, 3]`` ``(t, h, w)`` in patches; ``None`` for the others.
    positions: Gemma 4 (call kind ``patches``): int64 ``[1, L, 2]`` patch positions (``-1`` on
        padding), with ``pixels`` ``[1, L, C p^2]``; ``None`` for the others.
    """

    name: str
    kind: str
    pixels: torch.Tensor
    grid_thw: torch.Tensor | None
    positions: torch.Tensor | None = None
    # MiniCPM-V (call kind ``slices``): int32 ``[S, 2]`` patches of every slice, with ``pixels``
    # ``[1, C, p, n p]`` as its processor packs them; ``None`` for the others.
    target_sizes: torch.Tensor | None = None

    def __call__(self, tower: nn.Module) -> Any:
        if self.target_sizes is not None:
            return tower(self.pixels, target_sizes=self.target_sizes)
        if self.positions is not None:
            return tower(pixel_values=self.pixels, pixel_position_ids=self.positions)
        if self.grid_thw is None:
            return tower(pixel_values=self.pixels)
        return tower(self.pixels, grid_thw=self.grid_thw)


@dataclass
class Subject:
    """A tower under test, its family and its samples."""

    name: str
    family: Family
    tower: nn.Module
    samples: list[Sample]

    @property
    def depth(self) -> int:
        return len(self.family.hf.adapter(self.tower).blocks(self.tower))

    def flops(self, sample: Sample, config: IPCVConfig | None) -> float:
        """FLOPs of the tower on ``sample``, unpatched (``None``) or with ``config`` (see ``tower_flops``)."""
        return tower_flops(self.family, self.tower.config, sample, config)


def synthetic_image(index: int, size: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture: a smooth background, discs and stripes (varied by ``index``).

    Natural images mix flat regions (where neighbours reconstruct dropped tokens well) with edges
    and texture; random noise would have neither.
    """
    from PIL import Image

    generator = torch.Generator().manual_seed(seed * 1009 + index)
    axis = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    a, b, c = torch.rand(3, generator=generator).tolist()
    rgb = torch.stack([a * xx + (1 - a) * yy, 0.5 + 0.5 * torch.sin(6.28 * (b * xx + c)), (1 - xx) * c], -1)
    for _ in range(3):
        cx, cy, radius, shade = torch.rand(4, generator=generator).tolist()
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.05 + 0.2 * radius) ** 2
        rgb[disc] = torch.tensor([shade, 1 - shade, 0.5])
    stripes = (torch.sin(40 * (xx + yy * b)) > 0.6) & (yy > 0.7)
    rgb[stripes] = 1.0
    return Image.fromarray((rgb.clamp(0, 1) * 255).to(torch.uint8).numpy())


def synthetic_video(frames: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``frames`` pictures of ``synthetic_image(0)`` panning right by 1/16 of the width per frame."""
    wide = synthetic_image(0, 2 * size, seed).resize((2 * size, size))
    step = max(1, size // 16)
    return [wide.crop((i * step, 0, i * step + size, size)) for i in range(frames)]


def scaled(image: Image.Image, size: int) -> Image.Image:
    """``image`` in RGB with its longer side ``size`` pixels (aspect kept, the shorter at least 1)."""
    from PIL import Image as PILImage

    image = image.convert("RGB")
    width, height = image.size
    factor = size / max(width, height)
    return image.resize((max(1, round(width * factor)), max(1, round(height * factor))), PILImage.BICUBIC)


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_images(directory: Path) -> tuple[list[tuple[str, Image.Image]], list[tuple[str, list[Image.Image]]]]:
    """``(images, videos)`` of ``directory``: its image files, and each sub-directory's frames."""
    from PIL import Image

    if not directory.is_dir():
        raise FidelityError(f"--images: {directory} is not a directory")
    images = [(p.name, Image.open(p)) for p in _image_files(directory)]
    videos = [
        (d.name, [Image.open(p) for p in _image_files(d)])
        for d in sorted(directory.iterdir())
        if d.is_dir() and _image_files(d)
    ]
    if not images and not videos:
        raise FidelityError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return images, videos


def qwen_video_patches(frames: Sequence[Image.Image], image_processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A video's frames as Qwen's processors lay them out: ``(pixels [n, C*T*p*p], grid_thw [1, 3])``.

    Frames are resized to the first frame's size rounded to ``patch * merge`` pixels, normalised
    with the processor's mean / std, the last frame repeated up to a multiple of
    ``temporal_patch_size``; patches ordered merge window by merge window, as for images.
    """
    import numpy as np
    from PIL import Image as PILImage

    p, m, tps = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    unit = p * m
    width, height = frames[0].size
    width, height = max(unit, round(width / unit) * unit), max(unit, round(height / unit) * unit)
    arrays = [np.asarray(f.convert("RGB").resize((width, height), PILImage.BICUBIC)) for f in frames]
    video = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double() / 255  # [F, C, H, W]
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(image_processor.image_std, dtype=torch.float64)[:, None, None]
    video = (video - mean) / std
    if video.shape[0] % tps:
        video = torch.cat([video, video[-1:].expand(tps - video.shape[0] % tps, -1, -1, -1)])
    t, channels, gh, gw = video.shape[0] // tps, video.shape[1], height // p, width // p
    patches = video.reshape(t, tps, channels, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t * gh * gw, channels * tps * p * p).float(), torch.tensor([[t, gh, gw]])


def make_samples(
    family: Family,
    image_processor: Any,
    images: Sequence[tuple[str, Image.Image]],
    videos: Sequence[tuple[str, Sequence[Image.Image]]],
    image_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Sample]:
    """One ``Sample`` per image and (Qwen families) per video, through ``image_processor``.

    A CLIP / SigLIP checkpoint's processor may cut an image into several crops (LLaVA-NeXT's
    anyres): a bare tower call makes each crop its own item, where the full model makes the
    image's crops one item.
    """
    samples = []
    grid = family.kind.takes_grid_thw
    for name, image in images:
        if family.kind is TILES:
            # One image per call: its tiles are one item (the bare tower's default).
            out = image_processor(images=[scaled(image, image_size)], crop_to_patches=True, return_tensors="pt")
        else:
            out = image_processor(images=[scaled(image, image_size)], return_tensors="pt")
        pixels = out["pixel_values"]
        pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # [images, crops, C, H, W]
        grid_thw = out["image_grid_thw"].to(device) if grid else None
        positions = None
        if family.kind is PATCHES:
            # Trimmed to the image's real patches: no row is padding (the tower's outputs for the
            # real rows do not depend on padding rows, which are never keys), so every compared
            # row is a patch of the image. Real patches tile whole pooling windows.
            positions = out["image_position_ids"]
            real = int((positions != -1).all(-1).sum())
            pixels, positions = pixels[:, :real], positions[:, :real].to(device)
        target_sizes = out["target_sizes"].to(device) if family.kind is SLICES else None
        samples.append(Sample(name, "image", pixels.to(device, dtype), grid_thw, positions, target_sizes))
    if family.kind.videos:
        for name, frames in videos:
            frames = [scaled(f, image_size) for f in frames]
            # A processor laying out videos otherwise than Qwen's (Kimi-K2.5's) says how.
            if hasattr(image_processor, "video_patches"):
                pixels, grid = image_processor.video_patches(frames)
            else:
                pixels, grid = qwen_video_patches(frames, image_processor)
            samples.append(Sample(name, "video", pixels.to(device, dtype), grid.to(device)))
    return samples


def checkpoint_image_processor(path: Path) -> Any:
    """The checkpoint's image processor, the PIL implementation of the class its
    ``preprocessor_config.json`` names (no torchvision needed: transformers 5.17's
    ``AutoImageProcessor`` requires it)."""
    import json

    import transformers

    config_file = path / "preprocessor_config.json"
    if not config_file.is_file():
        raise FidelityError(f"--model: {path} has no preprocessor_config.json (its image processor)")
    name = json.loads(config_file.read_text()).get("image_processor_type", "").removesuffix("Fast")
    processor_class = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name, None)
    if processor_class is None:
        raise FidelityError(f"--model: transformers has no image processor {name!r} ({config_file})")
    return processor_class.from_pretrained(path)


def load_subject(
    *,
    preset: str | None = None,
    model: str | Path | None = None,
    images: str | Path | None = None,
    num_images: int = 2,
    video_frames: int = 4,
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Subject:
    """The tower (``preset`` name, or ``model``: a local checkpoint directory) and its samples.

    Args:
        images: a directory of images (and sub-directories of video frames); ``None`` for
            ``num_images`` synthetic images and, for Qwen families, a synthetic video of
            ``video_frames`` frames (``0``: none).
        image_size: longer image side in pixels; ``None``: 32 for presets, 448 for checkpoints.
        seed: the presets' weights and the synthetic images.
    """
    device = torch.device(device)
    if (preset is None) == (model is None):
        raise FidelityError("give exactly one of --preset and --model")
    if model is not None:
        from transformers import AutoModelForImageTextToText

        path = Path(model)
        if not path.is_dir():
            raise FidelityError(f"--model: {path} is not a local checkpoint directory")
        loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        try:
            family, tower = find_family(loaded)
        except TypeError as error:
            raise FidelityError(f"--model: {error}") from None
        image_processor = checkpoint_image_processor(path)
        name, size = str(path), image_size or CHECKPOINT_IMAGE_SIZE
    else:
        if preset not in PRESETS:
            raise FidelityError(f"--preset: one of {', '.join(PRESETS)}, got {preset!r}")
        family = PRESETS[preset]
        tower = build_tower(family.id, dtype=dtype, seed=seed)
        image_processor = family.image_processor(tower.config)
        name, size = preset, image_size or PRESET_IMAGE_SIZE
    tower = tower.to(device).eval()
    if images is not None:
        pictures, videos = read_images(Path(images))
    else:
        pictures = [(f"synthetic_{i}", synthetic_image(i, size, seed)) for i in range(num_images)]
        videos = [("synthetic_video", synthetic_video(video_frames, size, seed))] if video_frames else []
    samples = make_samples(family, image_processor, pictures, videos, size, dtype, device)
    if not samples:
        raise FidelityError("--images / --num-images: no images to run (only the Qwen families take videos)")
    return Subject(name, family, tower, samples)


# -- FLOPs ------------------------------------------------------------------------------------------
def tower_flops(family: Family, vision_config: Any, sample: Sample, config: IPCVConfig | None) -> float:
    """FLOPs of one tower call by the family's FLOP model (``Family.flops``), its shape read off
    the sample as the call kind describes it: ``grid_thw`` rows; the tiles of the one image of a
    ``tiles`` call; one item per crop or sub-image of a bare ``crops`` / ``sub_images`` call; the
    padded length and real patches of every image of a ``patches`` call; ``(1, h, w)`` of every
    image of an ``images`` call at its size."""
    count = sample.pixels.shape[0]
    if family.kind.takes_grid_thw:
        shape: Any = sample.grid_thw.tolist()
    elif family.kind is TILES:
        shape = [count]
    elif family.kind is SUB_IMAGES:
        shape = [[0]] * count
    elif family.kind is PATCHES:  # (padded length, real patches) of every image
        real = (sample.positions != -1).all(-1).sum(-1).tolist()
        shape = [(sample.positions.shape[1], int(n)) for n in real]
    elif family.kind is IMAGES:  # each image at its own size: (1, h, w) in patches
        patch = vision_config.patch_size
        shape = [(1, sample.pixels.shape[-2] // patch, sample.pixels.shape[-1] // patch)] * count
    elif family.kind is SLICES:  # every slice at its own size: (1, h, w) in patches
        shape = [(1, int(h), int(w)) for h, w in sample.target_sizes.tolist()]
    else:
        shape = [1] * count
    return family.flops(vision_config, shape, config).total
