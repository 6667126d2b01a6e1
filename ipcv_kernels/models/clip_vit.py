"""CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``), bare or inside
LLaVA 1.5, LLaVA-NeXT, LLaVA-OneVision, Gemma 3 and PaliGemma.

The towers are pre-norm encoders over a padded batch ``[B, L, D]`` (one image or crop per batch
element, dense attention inside it, no segment argument): a ``BatchedTowerAdapter``
(``ipcv_kernels.engine.batched``) runs them on packed kept rows from the prune layer on. CLIP
sequences start with a CLS token, which is pinned (always kept, not counted, never a neighbour);
SigLIP has none.

**Items.** A bare tower call makes each batch element one item. Inside a full model, the calls
that encode the images, ``get_image_features`` (and OneVision's ``get_video_features``), are
wrapped to tell the tower (for that call only):

- how its crops group into images: the anyres crops of one LLaVA-NeXT / OneVision image form one
  item, counted from ``image_sizes`` as the model counts them (``image_size_to_num_patches`` of
  the model's own module, over its ``image_grid_pinpoints``; OneVision encodes only the base crop
  of each image of a prompt with several images, ``batch_num_images``); neighbours may come from
  any crop of the image, attention stays within each crop. All frames of a OneVision video form
  one item;
- which layers the model reads: ``vision_feature_layer`` (LLaVA's default -2, or a list of
  layers, concatenated by the model) selects ``hidden_states[i]``, the output of block ``i - 1``.
  Each read block returns the restored full sequence ``[B, L, D]`` (spec step 7 at that block),
  the next block continues on the kept rows, and blocks past the last read one are skipped, since
  nothing reads them (so inside such a call the tower's ``last_hidden_state`` is the last read
  block's output). Gemma 3 and PaliGemma read the last output.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine import IPCVPatch, TowerCall, read_blocks
from ..engine.batched import BatchedTowerAdapter, PrenormLayer, sequence_segments
from ..selectors import token_grid


def anyres_crops(
    holder: nn.Module, image_sizes: torch.Tensor | Sequence, batch_num_images: torch.Tensor | Sequence[int] | None
) -> list[int]:
    """Crops per image of a LLaVA-NeXT / OneVision ``get_image_features`` call, as the model counts them.

    Args:
        holder: the model whose ``get_image_features`` is called (its config gives the grid
            pinpoints and the crop size; its module, ``image_size_to_num_patches``).
        image_sizes: int ``[num_images, 2]`` (height, width) of every image.
        batch_num_images: OneVision's images per prompt, ``None`` for none given: an image of a
            prompt with several images is encoded as its base crop alone.
    """
    # The model's own module defines the rule (LLaVA-NeXT's and OneVision's copies may diverge).
    modules = (sys.modules.get(cls.__module__) for cls in type(holder).__mro__)
    count = next(module.image_size_to_num_patches for module in modules if hasattr(module, "image_size_to_num_patches"))
    if batch_num_images is None:
        anyres = [True] * len(image_sizes)
    else:
        anyres = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if len(anyres) != len(image_sizes):
        raise ValueError(f"batch_num_images {list(batch_num_images)} must add up to the {len(image_sizes)} image_sizes")
    pinpoints, crop = holder.config.image_grid_pinpoints, holder.config.vision_config.image_size
    return [
        int(count(image_size=size, grid_pinpoints=pinpoints, patch_size=crop)) if crops else 1
        for size, crops in zip(image_sizes, anyres, strict=True)
    ]


class ClipViTAdapter(BatchedTowerAdapter):
    """CLIP / SigLIP encoder layers (``layer_norm1``, ``self_attn.{q,k,v,out}_proj``,
    ``layer_norm2``, ``mlp``); see the module docstring."""

    name = "clip_vit"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "encoder") or not hasattr(tower.encoder, "layers"):
            raise TypeError(
                f"the vision tower must be a CLIPVisionModel or SiglipVisionModel, got {type(tower).__name__}"
            )
        # CLIP's embeddings prepend a CLS token (a learned class embedding); SigLIP's do not.
        self.has_cls = hasattr(tower.embeddings, "class_embedding")
        self._patch_size = tower.config.patch_size
        return tower.encoder.layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap ``get_image_features`` / ``get_video_features`` of the model holding the tower (see
        the module docstring)."""
        for holder in self.model.modules() if self.model is not None else ():
            if getattr(holder, "vision_tower", None) is patch.tower:
                for name in ("get_image_features", "get_video_features"):
                    if hasattr(holder, name):
                        patch.wrap(holder, name, functools.partial(self._read_image_call, patch, holder, name))

    def _read_image_call(
        self, patch: IPCVPatch, holder: nn.Module, name: str, inner: Callable[..., Any]
    ) -> Callable[..., Any]:
        signature = inspect.signature(inner)

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            call = signature.bind_partial(*args, **kwargs).arguments
            hints: dict[str, Any] = {}
            layers = call.get("vision_feature_layer")
            if layers is None:
                layers = getattr(holder.config, "vision_feature_layer", -1)
            hints["read_blocks"] = read_blocks(layers, patch.depth)
            image_sizes = call.get("image_sizes")
            if name == "get_video_features":
                # [videos, frames, C, H, W], encoded frame by frame (transformers 5.17 names it pixel_values)
                videos = call.get("pixel_values_videos", call.get("pixel_values"))
                hints["sequences_per_image"] = [videos.shape[1]] * videos.shape[0]
            elif image_sizes is not None and getattr(holder.config, "image_grid_pinpoints", None) is not None:
                hints["sequences_per_image"] = anyres_crops(holder, image_sizes, call.get("batch_num_images"))
            with patch.hinted(**hints):
                return inner(*args, **kwargs)

        return get_image_features

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items (images: their crops' rows), one segment per crop, and the blocks the caller reads."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [B, C, H, W], got shape {tuple(pixel_values.shape)}")
        num_crops, _, height, width = pixel_values.shape
        length = (height // self._patch_size) * (width // self._patch_size) + int(self.has_cls)
        counts = hints.get("sequences_per_image") or [1] * num_crops
        if sum(counts) != num_crops:
            raise ValueError(f"crops per image {counts} must add up to the call's {num_crops} crops")
        segments = sequence_segments(num_crops, length, pixel_values.device)
        return TowerCall([count * length for count in counts], segments, hints.get("read_blocks"))

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each crop (image, frame, sub-image) its own part: CLS (if any) off the grid, patches row-major."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        num_crops, _, height, width = pixel_values.shape
        return token_grid([(num_crops, height // self._patch_size, width // self._patch_size)], cls=self.has_cls)

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        attention = block.self_attn
        return PrenormLayer(
            norm1=block.layer_norm1,
            q=attention.q_proj,
            k=attention.k_proj,
            v=attention.v_proj,
            out=attention.out_proj,
            norm2=block.layer_norm2,
            mlp=block.mlp,
            num_heads=attention.num_heads,
            head_dim=attention.head_dim,
            scale=attention.scale,
        )
