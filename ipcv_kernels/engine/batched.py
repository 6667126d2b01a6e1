"""Towers whose blocks take a padded batch ``[B, L, D]`` of equal-length sequences: InternViT,
CLIP, SigLIP.

Such a tower's blocks attend within each sequence (a tile, a crop, an image) and take no segment
argument. ``BatchedTowerAdapter`` packs the batch into rows ``[B * L, D]`` with one attention
segment per sequence; from the prune layer on the blocks receive and return packed kept rows
(the sequences then hold different token counts) and run one functional pre-norm layer,
``prenorm_layer``, whose attention is the varlen ``ngr_attention``: no padding, no per-sequence
Python loop, memory linear in the tokens. The restored output is unpacked to ``[B, L, D]``, so
the tower's own head (final norm, CLS split, pooling, projector) runs as usual. Blocks ``>= P``
therefore ignore the model's ``attn_implementation``: ``IPCVConfig.attention_backend`` picks the
kernel.

A sequence that starts with a CLS token has it pinned (``has_cls``): always kept, not counted in
its item's keep count, never a neighbour (``plan_with_pinned_tokens``).

**Padding rows** (``TowerCall.padding``: Idefics3's padded patches) are pinned the same way and
never serve as keys: every block, the model's own one and the stabilisation blocks alike, runs
its queries (padding rows included, since the model computes their outputs) over the key rows
that are not padding, ``ngr_attention`` with each sequence's key segment shrunk to those rows.
The key mask thus costs one gather of rows per block, never an ``n x n`` mask. A sequence whose
kept rows are all padding has no keys in a pruned block: its rows' attention output is 0 (as
``ngr_attention`` defines an empty key segment).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..ops import knn, ngr_attention, plan_ipcv, select_tokens, shrink_cu_seqlens, token_scores
from ..reference import IPCVPlan
from ..selectors import plan_from_scores, token_grid
from .vision import BlockCall, FamilyAdapter, ForwardState, TowerCall


@dataclass(frozen=True)
class PrenormLayer:
    """The parts of one pre-norm ViT layer, whatever the model calls them.

    ``y = x + attn_gain * out(attention(q(norm1(x)), k(norm1(x)), v(norm1(x))))``,
    ``x' = y + mlp_gain * mlp(norm2(y))``; ``q``, ``k``, ``v`` map ``[N, D]`` to ``[N, H * Dh]``
    (projections and any per-token norms), ``out`` maps ``[N, H * Dh]`` to ``[N, D]``; a gain of
    ``None`` is 1 (InternViT's layer scales are tensors ``[D]``).

    A layer with one fused projection gives ``qkv`` instead of ``q`` / ``k`` / ``v``: ``[N, D]``
    to the triple ``q, k, v`` ``[N, H * Dh]`` each. It runs on every row of the context (the
    query rows are a subset of them), so the attention-stabilisation layers also compute queries
    of the dropped rows: ``Nd * D * H * Dh`` extra multiply-adds per layer, the price of going
    through a layer whose weights cannot be sliced (vLLM repacks them on the CPU).
    """

    norm1: Callable[[torch.Tensor], torch.Tensor]
    q: Callable[[torch.Tensor], torch.Tensor] | None
    k: Callable[[torch.Tensor], torch.Tensor] | None
    v: Callable[[torch.Tensor], torch.Tensor] | None
    out: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    head_dim: int
    scale: float
    attn_gain: torch.Tensor | float | None = None
    mlp_gain: torch.Tensor | float | None = None
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def project(
        self, normed: torch.Tensor, query_rows: torch.Tensor | None, key_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q of ``query_rows``, k / v of ``key_rows`` of the normalised context ``[Nkv, D]``
        (``None``: every row), each ``[rows, H, Dh]``."""
        shape = (-1, self.num_heads, self.head_dim)
        if self.qkv is not None:
            q, k, v = self.qkv(normed)
            if query_rows is not None:
                q = q[query_rows]
            if key_rows is not None:
                k, v = k[key_rows], v[key_rows]
            return q.reshape(shape), k.reshape(shape), v.reshape(shape)
        queries = normed if query_rows is None else normed[query_rows]
        keys = normed if key_rows is None else normed[key_rows]
        return self.q(queries).reshape(shape), self.k(keys).reshape(shape), self.v(keys).reshape(shape)


def prenorm_layer(
    layer: PrenormLayer,
    queries: torch.Tensor,
    context: torch.Tensor,
    query_rows: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    attention_backend: str,
    key_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-norm layer on packed rows, outputs for the query rows only.

    Args:
        layer: the model layer's parts (its weights and norms are used, not its forward).
        queries: ``[Nq, D]`` float, the residual-stream rows that get an output.
        context: ``[Nkv, D]`` float (same dtype), the rows serving as keys / values.
        query_rows: int64 ``[Nq]`` rows of ``context`` equal to ``queries`` (their normalised
            states are reused), or ``None`` when ``context`` is ``queries``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S + 1]`` per-sequence segments of ``queries`` /
            the key rows.
        attention_backend: backend of ``ngr_attention``.
        key_rows: int64 ``[Nk']`` ascending rows of ``context`` serving as keys / values (the
            rows that are not padding), ``None``: all of them.

    Returns:
        ``[Nq, D]`` in ``queries``' dtype.
    """
    q, k, v = layer.project(layer.norm1(context), query_rows, key_rows)
    attended = ngr_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        softmax_scale=layer.scale,
        backend=attention_backend,
        skip_check=True,
    )
    update = layer.out(attended.reshape(queries.shape[0], -1))
    hidden = queries + (update if layer.attn_gain is None else layer.attn_gain * update)
    update = layer.mlp(layer.norm2(hidden))
    return hidden + (update if layer.mlp_gain is None else layer.mlp_gain * update)


def plan_with_pinned_tokens(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pinned: torch.Tensor,
    config: IPCVConfig,
    scores: torch.Tensor | None = None,
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
        scores: float ``[n]`` of the configured selector (pinned rows' ignored), ``None``: the
            default score, computed by the fused ``plan_ipcv``.
    """
    is_free = torch.ones(x_after.shape[0], dtype=torch.bool, device=x_after.device)
    is_free[pinned] = False
    free = is_free.nonzero().squeeze(1)
    free_items = torch.searchsorted(free, cu_items.to(free.dtype)).to(torch.int32)
    free_segments = torch.searchsorted(free, cu_seqlens.to(free.dtype)).to(torch.int32)
    if scores is None:
        sub = plan_ipcv(
            x_before[free],
            x_after[free],
            free_items,
            free_segments,
            config.ratio,
            config.num_neighbors,
            backend=config.ops_backend,
            skip_check=True,
        )
    else:
        sub = plan_from_scores(
            scores[free],
            x_after[free],
            free_items,
            free_segments,
            config.ratio,
            config.num_neighbors,
            backend=config.ops_backend,
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


def authors_plan(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_tiles: torch.Tensor,
    config: IPCVConfig,
    scores: torch.Tensor | None = None,
) -> IPCVPlan:
    """The plan of the paper authors' InternVL code (``scope="authors"``), for the InternVL
    adapters of every framework.

    Selection per tile: tile ``t`` keeps ``keep_count(N, r)`` of its ``N`` patch rows by score,
    and its CLS row (pinned, not counted). Neighbours: the ``k`` nearest of *all* kept rows of the
    call, CLS rows included (``cu_items`` is the whole call under this scope).

    Args:
        x_before, x_after: ``[n, D]`` float, input of block ``P-1`` and of block ``P``.
        cu_items: int32 ``[B + 1]`` item offsets (one item: the call).
        cu_tiles: int32 ``[tiles + 1]`` per-tile offsets; each tile starts with its CLS row.
        config: ratio, neighbours and planning backend.
        scores: float ``[n]`` of the configured selector, ``None``: the default score.
    """
    cls_rows = cu_tiles[:-1].to(torch.int64)
    is_free = torch.ones(x_after.shape[0], dtype=torch.bool, device=x_after.device)
    is_free[cls_rows] = False
    free = is_free.nonzero().squeeze(1)
    free_scores = token_scores(x_before[free], x_after[free], skip_check=True) if scores is None else scores[free]
    cu_free_tiles = torch.searchsorted(free, cu_tiles.to(free.dtype)).to(torch.int32)
    selection = select_tokens(free_scores, cu_free_tiles, config.ratio, backend=config.ops_backend, skip_check=True)
    keep = torch.cat([cls_rows, free[selection.keep]]).sort().values
    drop = free[selection.drop]
    neighbors = knn(x_after[drop], x_after[keep], config.num_neighbors, backend=config.ops_backend, skip_check=True)
    return IPCVPlan(
        keep=keep,
        drop=drop,
        cu_keep=torch.searchsorted(keep, cu_items.to(keep.dtype)).to(torch.int32),
        cu_drop=torch.searchsorted(drop, cu_items.to(drop.dtype)).to(torch.int32),
        neighbors=neighbors,
        cu_seqlens_kept=shrink_cu_seqlens(cu_tiles.to(torch.int32), keep),
    )


def without_padding(plan: IPCVPlan, padding: torch.Tensor) -> IPCVPlan:
    """``plan``, made over rows of which ``padding`` (bool ``[n]``) marks pinned padding rows, as
    the same plan over the other rows alone, in their order: what a framework that packs those rows
    without padding plans for the same input (vLLM's MiniCPM-V pads the slices transformers packs).

    Row indices (``keep``, ``drop``) count the real rows only; offsets into ``keep``
    (``cu_keep``, ``cu_seqlens_kept``) and neighbour positions in ``keep`` count its real rows;
    ``cu_drop`` is unchanged (padding rows are never dropped).
    """
    real = ~padding.to(device=plan.keep.device, dtype=torch.bool)
    row = real.cumsum(0) - 1  # the real row of every real row
    kept_real = real[plan.keep]
    # Real kept rows before each position of ``keep`` (and after its last).
    before = torch.cat([kept_real.new_zeros(1, dtype=torch.int64), kept_real.cumsum(0)])
    neighbors = torch.where(plan.neighbors >= 0, before[plan.neighbors.clamp_min(0).long()], plan.neighbors.long())
    return IPCVPlan(
        keep=row[plan.keep[kept_real]],
        drop=row[plan.drop],
        cu_keep=before[plan.cu_keep.long()].to(plan.cu_keep.dtype),
        cu_drop=plan.cu_drop,
        neighbors=neighbors.to(plan.neighbors.dtype),
        cu_seqlens_kept=before[plan.cu_seqlens_kept.long()].to(plan.cu_seqlens_kept.dtype),
    )


def sequence_segments(num_sequences: int, length: int, device: torch.device) -> torch.Tensor:
    """int32 ``[num_sequences + 1]``: one attention segment of ``length`` rows per sequence."""
    return torch.arange(num_sequences + 1, device=device, dtype=torch.int32) * length


@dataclass
class BatchedBlockCall(BlockCall):
    """A block call of a batched tower, with the forward's state: its padding rows, and the plan
    that says which of them a block's rows are, are read when the block runs."""

    state: ForwardState | None = None


class BatchedTowerAdapter(FamilyAdapter):
    """A ``FamilyAdapter`` for towers whose blocks take ``[B, L, D]`` (see the module docstring).

    Subclasses give ``blocks``, ``describe_call`` (items, ``sequence_segments`` as the call's
    segments, and its padding rows if any) and ``layer_parts``; ``has_cls`` pins every sequence's
    first row.
    """

    has_cls = True

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        """The parts of one of this family's layers."""
        raise NotImplementedError

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        return BatchedBlockCall(state.segments, None, args, kwargs, state=state)

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
        padding: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> IPCVPlan:
        rows = self.pinned_rows(cu_seqlens, padding)
        if rows is None:
            return super().plan(x_before, x_after, cu_items, cu_seqlens, config, scores=scores)
        return plan_with_pinned_tokens(x_before, x_after, cu_items, cu_seqlens, rows, config, scores)

    def pinned_rows(self, cu_seqlens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        """Every sequence's CLS row (``has_cls``) and the padding rows, ascending; ``None``: none."""
        pinned = []
        if self.has_cls:
            pinned.append(cu_seqlens[:-1].to(torch.int64))  # every sequence starts with its CLS token
        if padding is not None:
            pinned.append(padding.nonzero().squeeze(1))
        return torch.cat(pinned).unique() if pinned else None  # unique: sorted

    def key_rows(
        self, call: BlockCall, num_rows: int, cu_seqlens: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(key_rows, cu_seqlens_k)`` of a block's ``num_rows`` rows (all ``n``, or the kept
        ``Nk``) in segments ``cu_seqlens``: the rows that are not padding and their segments;
        ``(None, cu_seqlens)`` without padding. Memoised per forward (one host read per distinct
        segment tensor, not one per block)."""
        state = call.state if isinstance(call, BatchedBlockCall) else None
        if state is None or state.padding is None:
            return None, cu_seqlens
        memo = state.key_rows.get(id(cu_seqlens))
        if memo is None or memo[0] is not cu_seqlens:
            padding = state.padding
            if num_rows != padding.shape[0]:  # kept rows (a full-length input holds every row)
                padding = padding[state.plan.keep]
            rows = (~padding).nonzero().squeeze(1)
            memo = (cu_seqlens, (rows, shrink_cu_seqlens(cu_seqlens, rows)))
            state.key_rows[id(cu_seqlens)] = memo
        return memo[1]

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
        rows, cu_keys = self.key_rows(call, hidden.shape[0], cu_seqlens)
        return prenorm_layer(
            self.layer_parts(block), hidden, hidden, None, cu_seqlens, cu_keys, config.attention_backend, rows
        )

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
        parts = self.layer_parts(block)
        rows, cu_keys = self.key_rows(call, full.shape[0], call.cu_seqlens)
        return prenorm_layer(parts, kept, full, plan.keep, kept_cu_seqlens, cu_keys, config.attention_backend, rows)


class TiledTowerAdapter(BatchedTowerAdapter):
    """A batched tower whose call is a batch of image tiles ``pixel_values`` ``[tiles, 3, H, W]``,
    each embedded as ``[CLS, patch_1 .. patch_N]``: InternViT, in every framework.

    Items are images made of tiles: ``hints["tiles_per_image"]`` (what a wrapper around the tower
    call knows; see ``tiles_per_item``), else the call's tiles form one item. One attention
    segment per tile; every tile's CLS row is pinned. ``scope="authors"`` plans as the paper
    authors' InternVL code (``authors_plan``). Subclasses give ``blocks``, ``layer_parts`` and
    ``patch_size``.
    """

    def patch_size(self, tower: nn.Module) -> tuple[int, int]:
        """The tower's patch ``(height, width)`` in pixels."""
        raise NotImplementedError

    def tiles_per_item(self, hints: dict[str, Any], num_tiles: int) -> list[int]:
        """Tiles of each item of a call of ``num_tiles`` tiles."""
        return hints.get("tiles_per_image") or [num_tiles]

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items ``tiles * (1 + N)`` per image and the call's per-tile attention segments."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else (args[0] if args else None)
        if pixel_values is None:
            raise ValueError("IPCV needs the tower's pixel_values (a call with precomputed embeddings has no tiles)")
        num_tiles, _, height, width = pixel_values.shape
        patch_h, patch_w = self.patch_size(tower)
        tile_length = 1 + (height // patch_h) * (width // patch_w)
        counts = self.tiles_per_item(hints, num_tiles)
        if sum(counts) != num_tiles:
            raise ValueError(f"tiles_per_image {counts} must add up to the call's {num_tiles} tiles")
        segments = sequence_segments(num_tiles, tile_length, pixel_values.device)
        return TowerCall([count * tile_length for count in counts], segments, hints.get("read_blocks"))

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each tile its own part: its CLS row off the grid, then its patches row-major."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        num_tiles, _, height, width = pixel_values.shape
        patch_h, patch_w = self.patch_size(tower)
        return token_grid([(num_tiles, height // patch_h, width // patch_w)], cls=True)

    def plan(
        self,
        x_before: torch.Tensor,
        x_after: torch.Tensor,
        cu_items: torch.Tensor,
        cu_seqlens: torch.Tensor,
        config: IPCVConfig,
        padding: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> IPCVPlan:
        if config.scope != "authors":
            return super().plan(x_before, x_after, cu_items, cu_seqlens, config, padding, scores)
        return authors_plan(x_before, x_after, cu_items, cu_seqlens, config, scores)
