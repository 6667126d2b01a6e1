"""InternVL vision tower (InternViT: ``InternVLVisionModel``, in ``InternVLModel.vision_tower``).

InternViT differs from the Qwen towers in three ways, each handled here.

**Batched tiles, plain attention.** An image is cut into tiles; the tower embeds every tile as
``[CLS, patch_1 .. patch_N]`` and its layers take the batch ``[tiles, 1 + N, D]`` with dense
attention inside each tile and no segment arguments. The engine works on packed rows, so this
adapter packs the batch (``pack``: ``[tiles * (1 + N), D]``, one attention segment per tile) and,
from the prune layer on, the layers receive and return packed kept rows: after pruning the tiles
hold different token counts. Both the attention-stabilisation layers (queries: kept rows, keys /
values: kept + reconstructed rows of the same tile) and the pruned layers (kept rows of the tile
only) run one functional InternViT layer, ``internvit_layer``, whose attention is the varlen
``ngr_attention`` over per-tile segments: no padding, no per-tile Python loop, memory linear in the
tokens. The last layer restores the full sequence and ``unpack`` gives the tower its
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
  tile is its tile count (a forward pre-hook on the model sets them for the tower call inside;
  ``generate``, which recent transformers let encode the images before the prefill forward, is
  wrapped to read them from its own arguments);
- a bare tower call treats all its tiles as one item, unless ``set_tiles_per_image`` was given the
  per-image counts.

**Limits.** The tower's ``hidden_states`` (``output_hidden_states=True``) of layers ``P`` to
``depth - 2`` hold only the kept rows, packed ``[kept, D]``; a full model whose
``vision_feature_layer`` reads one of them raises ``ValueError`` (the InternVL-hf checkpoints use
``-1``, the last output, which is always complete).

Default settings for this family (the paper's InternVL2 setting): ``IPCVConfig.for_model(model)``
gives prune layer 7, ratio 0.65, 3 stabilisation blocks, 10 neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IPCVConfig
from ..ops import ngr_attention, plan_ipcv, shrink_cu_seqlens
from ..reference import IPCVPlan
from .engine import PATCH_ATTRIBUTE, BlockCall, FamilyAdapter, IPCVPatch


def internvit_layer(
    layer: nn.Module,
    queries: torch.Tensor,
    context: torch.Tensor,
    query_rows: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    attention_backend: str,
) -> torch.Tensor:
    """One ``InternVLVisionLayer`` on packed rows, outputs for the query rows only.

    ``y = x + lambda_1 * proj(attn(norm1(x)))``, ``out = y + lambda_2 * mlp(norm2(y))``, with
    ``q_norm`` / ``k_norm`` applied to the full-width projections as the model does.

    Args:
        layer: the model's ``InternVLVisionLayer`` (its weights and norms are used, not its forward).
        queries: ``[Nq, D]`` float, the residual-stream rows that get an output.
        context: ``[Nk, D]`` float (same dtype), the rows serving as keys / values.
        query_rows: int64 ``[Nq]`` rows of ``context`` equal to ``queries`` (their normalised
            states are reused), or ``None`` when ``context`` is ``queries``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S + 1]`` per-tile segments of ``queries`` / ``context``.
        attention_backend: backend of ``ngr_attention``.

    Returns:
        ``[Nq, D]`` in ``queries``' dtype.
    """
    attention = layer.attention
    width = context.shape[1]
    normed_context = layer.layernorm_before(context)
    normed_queries = normed_context if query_rows is None else normed_context[query_rows]
    q = attention.q_norm(attention.q_proj(normed_queries))
    k = attention.k_norm(attention.k_proj(normed_context))
    v = attention.v_proj(normed_context)
    heads, head_dim = attention.num_heads, attention.head_dim
    attended = ngr_attention(
        q.reshape(-1, heads, head_dim),
        k.reshape(-1, heads, head_dim),
        v.reshape(-1, heads, head_dim),
        cu_seqlens_q,
        cu_seqlens_k,
        softmax_scale=attention.scale,
        backend=attention_backend,
        skip_check=True,
    )
    attended = attention.projection_dropout(attention.projection_layer(attended.reshape(-1, width)))
    hidden = queries + layer.lambda_1 * attended
    update = layer.dropout(layer.mlp(layer.layernorm_after(hidden)))
    if layer.lambda_2 is not None:
        update = layer.lambda_2 * update
    return hidden + update


def plan_with_pinned_tokens(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pinned: torch.Tensor,
    config: IPCVConfig,
) -> IPCVPlan:
    """The spec's plan over the unpinned rows, with the ``pinned`` rows always kept.

    Selection counts and neighbour search see the unpinned rows only; pinned rows are added to
    ``keep`` (never neighbours, since neighbour indices are remapped from the unpinned plan).

    Args:
        x_before, x_after: ``[n, D]`` float, input of block ``P-1`` and of block ``P``.
        cu_items: int32 ``[B + 1]`` item offsets over the ``n`` rows.
        cu_seqlens: int32 ``[S + 1]`` attention segments over the ``n`` rows.
        pinned: int64 ``[Np]`` ascending rows that are never dropped.
        config: ratio, neighbours and planning backend.
    """
    is_free = torch.ones(x_after.shape[0], dtype=torch.bool, device=x_after.device)
    is_free[pinned] = False
    free = is_free.nonzero().squeeze(1)
    sub = plan_ipcv(
        x_before[free],
        x_after[free],
        torch.searchsorted(free, cu_items.to(free.dtype)).to(torch.int32),
        torch.searchsorted(free, cu_seqlens.to(free.dtype)).to(torch.int32),
        config.ratio,
        config.num_neighbors,
        backend=config.backend,
        skip_check=True,
    )
    kept_free = free[sub.keep]
    keep = torch.cat([pinned, kept_free]).sort().values
    row_in_keep = torch.searchsorted(keep, kept_free)
    valid = sub.neighbors >= 0
    neighbors = torch.where(valid, row_in_keep[sub.neighbors.clamp_min(0)], sub.neighbors)
    return IPCVPlan(
        keep=keep,
        drop=free[sub.drop],
        cu_keep=torch.searchsorted(keep, cu_items.to(keep.dtype)).to(torch.int32),
        cu_drop=sub.cu_drop,
        neighbors=neighbors,
        cu_seqlens_kept=shrink_cu_seqlens(cu_seqlens.to(torch.int32), keep),
    )


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


def set_tiles_per_image(model: nn.Module, tiles_per_image: Sequence[int] | None) -> None:
    """Tell a patched InternVL tower how many consecutive tiles each image of its calls has.

    For direct tower calls (calls through the full model read the counts from ``input_ids``).
    The setting stays until changed, cleared with ``None`` or the patch removed; each call checks
    that the counts add up to its number of tiles.

    Raises:
        TypeError: ``model`` is not a patched InternVL model or tower, or bad counts.
    """
    from .registry import find_tower

    tower, _ = find_tower(model)
    patch = getattr(tower, PATCH_ATTRIBUTE, None)
    if patch is None or not isinstance(patch.adapter, InternVLAdapter):
        raise TypeError("model must be an InternVL model or tower patched with apply_ipcv")
    if tiles_per_image is not None:
        tiles_per_image = list(tiles_per_image)
        if not all(isinstance(count, int) and count >= 1 for count in tiles_per_image):
            raise TypeError(f"tiles_per_image must be positive ints, got {tiles_per_image!r}")
    patch.adapter.tiles_per_image = tiles_per_image


class GenerateTilesPatch:
    """``generate`` of one model instance, wrapped so that its tower calls know the prompt's tiles.

    Recent transformers encode the images before the prefill forward (``get_image_features`` with
    the pixels alone), so the forward pre-hook that reads tile counts from ``input_ids`` never sees
    that tower call: the counts are read from ``generate``'s own arguments instead. ``remove``
    restores the class's ``generate``.
    """

    def __init__(self, adapter: InternVLAdapter, model: nn.Module, image_token_id: int) -> None:
        self.model = model
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            pixel_values = kwargs.get("pixel_values")
            tiles = None
            if isinstance(input_ids, torch.Tensor) and isinstance(pixel_values, torch.Tensor):
                tiles = image_tile_counts(input_ids, image_token_id, pixel_values.shape[0])
            adapter.generate_tiles = tiles
            try:
                return original(*args, **kwargs)
            finally:
                adapter.generate_tiles = None

        self.wrapper = generate
        model.generate = generate

    def remove(self) -> None:
        if vars(self.model).get("generate") is self.wrapper:
            del self.model.generate


class InternVLAdapter(FamilyAdapter):
    name = "internvl"
    default_settings: ClassVar[dict[str, Any]] = dict(prune_layer=7, ratio=0.65, as_layers=3, num_neighbors=10)

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__(model)
        self.tiles_per_image: list[int] | None = None  # set_tiles_per_image, for bare tower calls
        self._prompt_tiles: list[int] | None = None  # from input_ids, during one full-model forward
        self.generate_tiles: list[int] | None = None  # from generate's input_ids, during one generate
        self._tile_segments: torch.Tensor | None = None  # int32 [tiles + 1] of the current call
        self._patch: IPCVPatch | None = None

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "encoder") or not hasattr(tower.encoder, "layer"):
            raise TypeError(f"the InternVL vision tower must be an InternVLVisionModel, got {type(tower).__name__}")
        return tower.encoder.layer

    def install_hooks(self, patch: IPCVPatch) -> list[torch.utils.hooks.RemovableHandle]:
        self._patch = patch
        handles = []
        for module in self.model.modules() if self.model is not None else ():
            if getattr(module, "vision_tower", None) is patch.tower:
                handles.append(module.register_forward_pre_hook(self._read_prompt_tiles, with_kwargs=True))
                handles.append(module.register_forward_hook(self._forget_prompt_tiles, always_call=True))
        if self.model is not None and hasattr(self.model, "generate") and handles:
            handles.append(GenerateTilesPatch(self, self.model, self.model.config.image_token_id))
        return handles

    def _read_prompt_tiles(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._check_feature_layer(kwargs.get("vision_feature_layer"), module.config.vision_feature_layer)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        if input_ids is None or pixel_values is None:
            self._prompt_tiles = None
            return
        self._prompt_tiles = image_tile_counts(input_ids, module.config.image_token_id, pixel_values.shape[0])

    def _forget_prompt_tiles(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._prompt_tiles = None

    def _check_feature_layer(self, requested: int | list[int] | None, default: int | list[int]) -> None:
        """The model may read ``hidden_states[i]`` of the tower instead of its last output; those
        of layers ``P .. depth-2`` hold only the kept rows, so refuse them with a clear error."""
        layers = default if requested is None else requested
        depth, prune_layer = self._patch.depth, self._patch.config.prune_layer
        for layer in [layers] if isinstance(layers, int) else layers:
            index = layer % (depth + 1)  # hidden_states[0] is the embedding, [i] layer i-1's output
            if layer != -1 and prune_layer < index < depth:
                raise ValueError(
                    f"vision_feature_layer {layer} reads a tower hidden state that IPCV prunes; "
                    f"use -1 or a prune_layer >= {index}"
                )

    # -- one tower call -------------------------------------------------------------------------
    def item_lengths(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[int]:
        """``tiles * (1 + N)`` per image; also records the call's per-tile attention segments."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        num_tiles, _, height, width = pixel_values.shape
        patch_h, patch_w = tower.embeddings.patch_embeddings.patch_size
        tile_length = 1 + (height // patch_h) * (width // patch_w)
        self._tile_segments = torch.arange(num_tiles + 1, device=pixel_values.device, dtype=torch.int32) * tile_length
        counts = self._prompt_tiles or self.generate_tiles or self.tiles_per_image or [num_tiles]
        if sum(counts) != num_tiles:
            raise ValueError(f"tiles_per_image {counts} must add up to the call's {num_tiles} tiles")
        return [count * tile_length for count in counts]

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any]) -> BlockCall:
        return BlockCall(self._tile_segments, None, args, kwargs)

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])

    def unpack(self, packed: torch.Tensor, layout: torch.Size) -> torch.Tensor:
        return packed.view(layout)

    def plan(
        self,
        x_before: torch.Tensor,
        x_after: torch.Tensor,
        cu_items: torch.Tensor,
        cu_seqlens: torch.Tensor,
        config: IPCVConfig,
    ) -> IPCVPlan:
        cls_rows = cu_seqlens[:-1].to(torch.int64)  # every tile starts with its CLS token
        return plan_with_pinned_tokens(x_before, x_after, cu_items, cu_seqlens, cls_rows, config)

    # -- the layers from the prune layer on -------------------------------------------------------
    def run_block(
        self,
        block: nn.Module,
        forward: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        call: BlockCall,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        cu_seqlens = cu_seqlens.to(torch.int32)
        backend = self._patch.config.attention_backend
        return internvit_layer(block, hidden, hidden, None, cu_seqlens, cu_seqlens, backend)

    def stabilised_block(
        self,
        block: nn.Module,
        kept: torch.Tensor,
        full: torch.Tensor,
        plan: IPCVPlan,
        call: BlockCall,
        config: IPCVConfig,
        kept_cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        return internvit_layer(block, kept, full, plan.keep, kept_cu_seqlens, call.cu_seqlens, config.attention_backend)
