"""Idefics3 and SmolVLM vision towers (``Idefics3VisionTransformer``, ``SmolVLMVisionTransformer``),
bare or inside ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``.

The towers are SigLIP encoders of variable resolution: a padded batch ``[B, L, D]`` of
sub-images (no CLS), whose ``patch_attention_mask`` ``[B, H/p, W/p]`` marks the patches of a
sub-image that lie in its padding. The blocks' layers are SigLIP's, so the adapter is
``ClipViTAdapter``'s (``engine.batched``: packed kept rows through ``ngr_attention`` from the prune
layer on) with two differences:

- **Padding patches** are the call's ``TowerCall.padding``: pinned like a CLS token (always kept,
  not counted in the item's ``n``, never a neighbour) and never keys in any block, as the model
  masks them. Their own outputs are computed as the model computes them (they reach its pixel
  shuffle), so ratio 0 equals the unpatched tower.
- **Items.** A bare tower call makes each batch element (sub-image) one item. Inside a full
  model, ``get_image_features(pixel_values [B, N, C, H, W], pixel_attention_mask)`` is wrapped:
  it drops the sub-images that are all zeros (padding images) and encodes the rest, so the real
  sub-images of each prompt ``b`` (counted as the model counts them) form one item. The processor
  flattens the sub-images of all images of a prompt into that one row ``b`` and the call has no
  argument that tells where one image ends (nor does the model's config name the tokens of the
  prompt that do), so with several images in one prompt their sub-images together form one item
  by default; with one image per prompt the item is exactly that image. Whoever built the prompt
  knows the split: ``ik.set_tiles_per_image(model, counts)`` gives the sub-images of each image
  (in call order), which then override both defaults; inside a full model the counts must split
  each prompt's real sub-images exactly (an image never spans two prompts).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..engine import IPCVPatch, TowerCall
from ..engine.batched import sequence_segments
from .clip_vit import ClipViTAdapter


def real_sub_images(pixel_values: torch.Tensor) -> list[int]:
    """Real sub-images per prompt of ``pixel_values`` ``[B, N, C, H, W]``: those not all zeros,
    the model's own test for its padding images."""
    if pixel_values.dim() != 5:
        raise ValueError(f"pixel_values must be [B, N, C, H, W], got shape {tuple(pixel_values.shape)}")
    return (pixel_values != 0).flatten(2).any(-1).sum(1).tolist()


class Idefics3Adapter(ClipViTAdapter):
    """Idefics3 / SmolVLM encoder layers (SigLIP's names) with padding patches; see the module docstring."""

    name = "idefics3"

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__(model)
        # ``set_tiles_per_image``: a setting of this patch (sub-images per image), not per call.
        self.tiles_per_image: list[int] | None = None

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "encoder") or not hasattr(tower.encoder, "layers"):
            raise TypeError(
                "the vision tower must be an Idefics3VisionTransformer or SmolVLMVisionTransformer, "
                f"got {type(tower).__name__}"
            )
        self.has_cls = False
        self._patch_size = tower.config.patch_size
        return tower.encoder.layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap ``get_image_features`` of the model holding the tower (``vision_model``)."""
        for holder in self.model.modules() if self.model is not None else ():
            if getattr(holder, "vision_model", None) is patch.tower and hasattr(holder, "get_image_features"):
                patch.wrap(holder, "get_image_features", functools.partial(self._read_sub_images, patch))

    def _read_sub_images(self, patch: IPCVPatch, inner: Callable[..., Any]) -> Callable[..., Any]:
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
            with patch.hinted(sequences_per_image=real_sub_images(pixel_values)):
                return inner(*args, **kwargs)

        return get_image_features

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items (images: their real sub-images' rows), one segment per sub-image, padding rows."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        mask = kwargs["patch_attention_mask"] if "patch_attention_mask" in kwargs else (args[1:] or (None,))[0]
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [B, C, H, W], got shape {tuple(pixel_values.shape)}")
        num_sequences, _, height, width = pixel_values.shape
        grid = (num_sequences, height // self._patch_size, width // self._patch_size)
        padding = None
        if mask is not None:
            if tuple(mask.shape) != grid:
                raise ValueError(
                    f"patch_attention_mask must be {list(grid)} (one flag per patch), got {list(mask.shape)}"
                )
            padding = ~mask.to(torch.bool).reshape(-1)
            if not bool(padding.any()):  # nothing to mask: the plain path
                padding = None
        per_prompt = hints.get("sequences_per_image")
        if per_prompt is not None and sum(per_prompt) == 0 and num_sequences == 1:
            per_prompt = [1, *per_prompt[1:]]  # SmolVLM encodes the first sub-image when all are padding
        counts = self.tiles_per_image or per_prompt or [1] * num_sequences
        if sum(counts) != num_sequences:
            raise ValueError(
                f"sub-images per image {counts} must add up to the call's {num_sequences} sub-images"
                + (" (counts from ik.set_tiles_per_image)" if self.tiles_per_image else "")
            )
        if self.tiles_per_image and per_prompt:
            ends = set(itertools.accumulate(self.tiles_per_image))
            if not set(itertools.accumulate(count for count in per_prompt if count)) <= ends:
                raise ValueError(
                    f"tiles_per_image {self.tiles_per_image} (ik.set_tiles_per_image) must split each prompt's "
                    f"real sub-images {per_prompt} into whole images"
                )
        length = grid[1] * grid[2]
        segments = sequence_segments(num_sequences, length, pixel_values.device)
        return TowerCall([count * length for count in counts], segments, padding=padding)
