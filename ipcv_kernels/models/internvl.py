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
  tile is its tile count (a wrapper of the model's forward hands them to the tower call inside,
  for that call only; ``generate``, which recent transformers let encode the images before the
  prefill forward, is wrapped to read them from its own arguments);
- a bare tower call treats all its tiles as one item, unless ``ik.set_tiles_per_image`` was given
  the per-image counts (a setting of the patch, kept until changed).

**Limits.** The tower's ``hidden_states`` (``output_hidden_states=True``) of layers ``P`` to
``depth - 2`` hold only the kept rows, packed ``[kept, D]``; a full model whose
``vision_feature_layer`` reads one of them raises ``ValueError`` (the InternVL-hf checkpoints use
``-1``, the last output, which is always complete).

Recommended settings for this family: see the family table, ``ipcv_kernels.models.families``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, FamilyAdapter, ForwardState, IPCVPatch, TowerCall
from ..ops import ngr_attention, plan_ipcv, shrink_cu_seqlens
from ..reference import IPCVPlan


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


class InternVLAdapter(FamilyAdapter):
    name = "internvl"

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__(model)
        # ``set_tiles_per_image``: a setting of this patch for bare tower calls (not per call).
        self.tiles_per_image: list[int] | None = None
        self._patch: IPCVPatch | None = None

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "encoder") or not hasattr(tower.encoder, "layer"):
            raise TypeError(f"the InternVL vision tower must be an InternVLVisionModel, got {type(tower).__name__}")
        return tower.encoder.layer

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap the forward of the model holding the tower (and ``generate``) so that their tower
        calls know the prompt's tiles per image (``hints["tiles_per_image"]``, this call only)."""
        self._patch = patch
        holders = (
            [m for m in self.model.modules() if getattr(m, "vision_tower", None) is patch.tower] if self.model else []
        )
        for holder in holders:
            patch.wrap(holder, "forward", functools.partial(self._read_prompt_tiles, patch, holder, True))
        if holders and hasattr(self.model, "generate"):
            # Recent transformers encode the images before the prefill forward (``get_image_features``
            # with the pixels alone), so generate's own arguments give the counts for that call.
            patch.wrap(self.model, "generate", functools.partial(self._read_prompt_tiles, patch, self.model, False))

    def _read_prompt_tiles(
        self, patch: IPCVPatch, holder: nn.Module, is_forward: bool, inner: Callable[..., Any]
    ) -> Callable[..., Any]:
        """``inner`` (``holder.forward`` or ``generate``) reading the tile counts from its arguments."""
        image_token_id = holder.config.image_token_id

        def call(*args: Any, **kwargs: Any) -> Any:
            if is_forward:
                self._check_feature_layer(kwargs.get("vision_feature_layer"), holder.config.vision_feature_layer)
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
    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items ``tiles * (1 + N)`` per image and the call's per-tile attention segments."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        num_tiles, _, height, width = pixel_values.shape
        patch_h, patch_w = tower.embeddings.patch_embeddings.patch_size
        tile_length = 1 + (height // patch_h) * (width // patch_w)
        segments = torch.arange(num_tiles + 1, device=pixel_values.device, dtype=torch.int32) * tile_length
        counts = hints.get("tiles_per_image") or self.tiles_per_image or [num_tiles]
        if sum(counts) != num_tiles:
            raise ValueError(f"tiles_per_image {counts} must add up to the call's {num_tiles} tiles")
        return TowerCall([count * tile_length for count in counts], segments)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        return BlockCall(state.segments, None, args, kwargs)

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
        config: IPCVConfig,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        cu_seqlens = cu_seqlens.to(torch.int32)
        return internvit_layer(block, hidden, hidden, None, cu_seqlens, cu_seqlens, config.attention_backend)

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
