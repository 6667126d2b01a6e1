"""InternVL vision tower (InternViT: ``InternVLVisionModel``, in ``InternVLModel.vision_tower``).

InternViT differs from the Qwen towers in three ways, each handled here.

**Batched tiles, plain attention.** An image is cut into tiles; the tower embeds every tile as
``[CLS, patch_1 .. patch_N]`` and its layers take the batch ``[tiles, 1 + N, D]`` with dense
attention inside each tile and no segment arguments. The engine works on packed rows, so this
adapter (a ``BatchedTowerAdapter``, ``ipcv_kernels.engine.batched``) packs the batch into
``[tiles * (1 + N), D]`` rows, one attention segment per tile, and from the prune layer on the
layers receive and return packed kept rows: after pruning the tiles hold different token counts.
Both the attention-stabilisation layers (queries: kept rows, keys / values: kept + reconstructed
rows of the same tile) and the pruned layers (kept rows of the tile only) run the functional
pre-norm layer ``prenorm_layer`` on this layer's parts (``layer_parts``: ``q_norm`` / ``k_norm``,
layer scales), whose attention is the varlen ``ngr_attention`` over per-tile segments: no
padding, no per-tile Python loop, memory linear in the tokens. The last layer restores the full sequence and ``unpack`` gives the tower its
``[tiles, 1 + N, D]`` back, so the final norm, the CLS split, the pixel shuffle and the projector
of ``InternVLModel`` run as usual. (Layers ``>= P`` therefore ignore the model's
``attn_implementation``: ``IPCVConfig.attention_backend`` picks the kernel.)

**CLS tokens are never dropped.** Every tile's CLS token is pinned: it is always kept, it does not
count towards the item's keep count ``max(1, int(n_patches * (1 - r)))`` (``n_patches`` = patch
tokens of the item, all tiles), and it is never a neighbour of a dropped patch token (``plan``
runs the spec's selection and neighbour search on the patch tokens alone).

**Items are images, made of tiles.** Neighbours may come from any tile of the same image, never
from another image. The tower itself only sees a batch of tiles, so:

- a call through ``InternVLModel`` / ``InternVLForConditionalGeneration`` reads the tile counts
  from ``input_ids``: the processor writes ``image_seq_length * tiles`` image-context tokens per
  image, as one run between the image's start and end tokens, so each run of ``image_token_id`` is
  one image (each video frame is one such run, hence one item) and its length over the tokens per
  tile is its tile count (a wrapper of the model's forward hands them to the tower call inside,
  for that call only; ``generate``, which recent transformers let encode the images before the
  prefill forward, is wrapped to read them from its own arguments);
- a bare tower call treats all its tiles as one item, unless ``ik.set_tiles_per_image`` was given
  the per-image counts (a setting of the patch, kept until changed).

**Read layers.** A full model reads ``hidden_states[vision_feature_layer]`` of the tower (the
InternVL-hf checkpoints: ``-1``, the last output). ``get_image_features`` is wrapped to tell the
tower call which layer that is: its output is the restored full sequence and the layers after it
are skipped (``TowerCall.read_blocks``). A direct tower call's ``hidden_states`` of layers ``P``
to ``depth - 2`` hold only the kept rows, packed ``[kept, D]``.

Recommended settings for this family: see the family table, ``ipcv_kernels.families``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import IPCVPatch, read_blocks
from ..engine.batched import PrenormLayer, TiledTowerAdapter


def image_tile_counts(input_ids: torch.Tensor, image_token_id: int, num_tiles: int) -> list[int] | None:
    """Tiles of every image of a prompt batch, in the order the model scatters image features.

    Each maximal run of ``image_token_id`` in a row of ``input_ids`` (int ``[B, S]``) is one image
    (or video frame); its tile count is the run length over the tokens per tile
    (``total image tokens / num_tiles``). ``None`` when the runs do not divide into whole tiles.
    """
    is_image = F.pad((input_ids == image_token_id).to(torch.int8), (1, 1))
    steps = is_image.diff(dim=1)
    starts, ends = (steps == 1).nonzero(), (steps == -1).nonzero()  # row-major order
    lengths = (ends[:, 1] - starts[:, 1]).tolist()
    total = sum(lengths)
    if num_tiles <= 0 or total == 0 or total % num_tiles:
        return None
    per_tile = total // num_tiles
    if any(length % per_tile for length in lengths):
        return None
    return [length // per_tile for length in lengths]


class InternVLAdapter(TiledTowerAdapter):
    name = "internvl"

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__(model)
        # ``set_tiles_per_image``: a setting of this patch for bare tower calls (not per call).
        self.tiles_per_image: list[int] | None = None

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "encoder") or not hasattr(tower.encoder, "layer"):
            raise TypeError(f"the InternVL vision tower must be an InternVLVisionModel, got {type(tower).__name__}")
        return tower.encoder.layer

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap the forward of the model holding the tower (and ``generate``) so that their tower
        calls know the prompt's tiles per image (``hints["tiles_per_image"]``, this call only)."""
        holders = (
            [m for m in self.model.modules() if getattr(m, "vision_tower", None) is patch.tower] if self.model else []
        )
        for holder in holders:
            patch.wrap(holder, "forward", functools.partial(self._read_prompt_tiles, patch, holder))
            patch.wrap(holder, "get_image_features", functools.partial(self._read_feature_layer, patch, holder))
        if holders and hasattr(self.model, "generate"):
            # Recent transformers encode the images before the prefill forward (``get_image_features``
            # with the pixels alone), so generate's own arguments give the counts for that call.
            patch.wrap(self.model, "generate", functools.partial(self._read_prompt_tiles, patch, self.model))

    def _read_prompt_tiles(self, patch: IPCVPatch, holder: nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``inner`` (``holder.forward`` or ``generate``) reading the tile counts from its arguments."""
        image_token_id = holder.config.image_token_id

        def call(*args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
            tiles = None
            if isinstance(input_ids, torch.Tensor) and isinstance(pixel_values, torch.Tensor):
                tiles = image_tile_counts(input_ids, image_token_id, pixel_values.shape[0])
            if tiles is None:
                return inner(*args, **kwargs)
            with patch.hinted(tiles_per_image=tiles):
                return inner(*args, **kwargs)

        return call

    def _read_feature_layer(self, patch: IPCVPatch, holder: nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``get_image_features`` telling its tower call which layers it reads: ``hidden_states``
        of ``vision_feature_layer`` (the argument, else the config) hold the restored sequence."""
        signature = inspect.signature(inner)

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            layers = signature.bind_partial(*args, **kwargs).arguments.get("vision_feature_layer")
            layers = holder.config.vision_feature_layer if layers is None else layers
            with patch.hinted(read_blocks=read_blocks(layers, patch.depth)):
                return inner(*args, **kwargs)

        return get_image_features

    # -- one tower call -------------------------------------------------------------------------
    def patch_size(self, tower: nn.Module) -> tuple[int, int]:
        return tuple(tower.embeddings.patch_embeddings.patch_size)

    def tiles_per_item(self, hints: dict[str, Any], num_tiles: int) -> list[int]:
        return hints.get("tiles_per_image") or self.tiles_per_image or [num_tiles]

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        """``InternVLVisionLayer``: ``q_norm`` / ``k_norm`` on the full-width projections, layer
        scales ``lambda_1`` / ``lambda_2`` (the latter may be ``None``)."""
        attention = block.attention
        return PrenormLayer(
            norm1=block.layernorm_before,
            q=lambda x: attention.q_norm(attention.q_proj(x)),
            k=lambda x: attention.k_norm(attention.k_proj(x)),
            v=attention.v_proj,
            out=lambda x: attention.projection_dropout(attention.projection_layer(x)),
            norm2=block.layernorm_after,
            mlp=lambda x: block.dropout(block.mlp(x)),
            num_heads=attention.num_heads,
            head_dim=attention.head_dim,
            scale=attention.scale,
            attn_gain=block.lambda_1,
            mlp_gain=block.lambda_2,
        )
