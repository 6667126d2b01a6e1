"""Analytic FLOP model of a ViT tower, unpatched and with IPCV, and the speedup it predicts.

Units: FLOPs, one multiply-add = 2 FLOPs. Per token row the model counts:

Matmul work (``linear`` and ``attention``, present in the unpatched model too), width ``D``, MLP
hidden ``M``, ``q`` query rows and ``kv`` key/value rows in a block, attention segments with
``q_s`` query and ``k_s`` key rows:

- full block (``"full"``, ``n`` rows): ``linear = 2n(3D^2 + D^2 + 2DM)`` (fused qkv, output
  projection, MLP fc1 + fc2); ``attention = 4D * sum_s n_s^2`` (``Q K^T`` and ``P V``, all heads:
  ``2 * q_s * k_s * head_dim * heads`` each). Attention is per segment (one image / video frame),
  never across the packed batch.
- attention-stabilisation block with kept queries (``"stabilised"``, ``as_queries="kept"``,
  ``q = Nk`` kept rows, ``kv = n`` rows): ``linear = 2(q D^2 + kv 2D^2 + q D^2 + q 2DM)``
  (``W_q`` on kept rows, ``W_k, W_v`` on all rows, output projection and MLP on kept rows);
  ``attention = 4D * sum_s q_s k_s``.
- attention-stabilisation block, paper formulation (``"stabilised_all"``, ``as_queries="all"``):
  the model's own block on all ``n`` rows, then the dropped rows are discarded: the cost of a full
  block.
- pruned block (``"pruned"``): a full block on the ``Nk`` kept rows, segments shrunk to their
  kept rows.
- padding rows (Idefics3's padded patches, ``padding``): keys in the blocks before ``P`` (the
  model's own block attends densely under its mask, so it pays for them), never keys from ``P``
  on (``W_k, W_v`` and attention skip them: ``kv`` and ``k_s`` exclude them), queries in every
  block (kept, like a CLS token, and not counted in their item's ``n``).
- read layers (``read_blocks``: LLaVA's ``vision_feature_layer``): blocks after the last one read
  are not run, so they count nothing, and every read block from ``P`` on restores the full
  sequence (one NGR reconstruction each).
- patch embedding ``2 n (C T p^2) D`` and PatchMerger ``2 (n / s^2)(s^2 D)(s^2 D + H)`` (``s`` the
  spatial merge, ``H`` the output width), identical with and without IPCV; counted only when their
  sizes are given, so that the ratio is the whole tower's.

IPCV's own work (``overhead``: no counterpart in the unpatched model; element-wise except the
distance GEMM), per item with ``n_i`` rows, ``k_i`` kept, ``d_i = n_i - k_i`` dropped and
``k' = min(num_neighbors, k_i)``:

- planning at block ``P``: scores ``||x_P - x_{P-1}||`` ``3 n D``; neighbour search, only when
  ``d_i > 0``: the distance GEMM ``2 d_i k_i D`` plus squared norms ``2 D (d_i + k_i)``; top-k
  is comparisons, not counted;
- NGR reconstruction (each stabilisation block, and the final restoration), only when
  ``d_i > 0``: ``k_i D`` (``h - base``) ``+ d_i (k' + 2) D`` (neighbour sum, mean, ``+ base``).

The matmul terms equal what ``torch.utils.flop_counter.FlopCounterMode`` counts on a real Qwen2-VL
tower, unpatched and patched (``tests/bench/test_flops.py``).

Towers: ``qwen2_vl_flops`` (Qwen2-VL: every block attends per image / frame) and
``qwen2_5_vl_flops`` (Qwen2.5-VL: windowed attention except in ``fullatt_block_indexes``) read a
vision config and ``grid_thw`` rows; each family's row in the family table (``Family.flops``)
names its model.
``internvl_flops`` and ``clip_vit_flops`` (CLS pinned, read layers) and ``idefics3_flops``
(sub-images with padding patches) count the towers of fixed-size tiles / crops / sub-images. The
matmul terms of the latter two equal ``FlopCounterMode``'s count too, padding and read layers
included (``ngr_attention``, a custom op the counter cannot see, added back).

Not counted anywhere (``O(n D)`` element-wise, under 1% of a block at ViT widths and identical in
both towers): layer norms, activations, softmax, rotary, residual adds, gathers and scatters.

Exactness: the kept count per item is the spec's ``max(1, int(n_i (1 - r)))``
(``ipcv_kernels.reference.selection.keep_count``), so totals are exact for items with one
attention segment (images). For items with several segments (video frames, tiles, anyres crops,
sub-images) the split of kept rows among the segments depends on the data; the model spreads them
in proportion to the segments' unpinned rows. That minimises ``sum_s q_s^2``, so for such items
the IPCV estimate of attention is a lower bound and the predicted speedup an upper bound (linear
terms stay exact). With ``ratio = 0`` every row is kept: the matmul work equals
the unpatched tower's exactly (both ``as_queries``), and only the score computation remains as
overhead (``predicted_speedup(..., include_overhead=False) == 1.0`` exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ._validation import check_choice, check_int
from .config import AS_QUERIES, IPCVConfig

# The spec's one keep rule, max(1, int(n * (1 - r))). It returns 0 for an empty item where the
# rule alone would give 1; the FLOP model never asks about one (``_items`` rejects empty segments).
from .reference.selection import keep_count

BLOCK_KINDS = ("full", "stabilised", "stabilised_all", "pruned")


@dataclass(frozen=True)
class BlockFlops:
    """FLOPs of one block.

    kind: one of ``BLOCK_KINDS``. query_rows / key_rows: rows whose queries / keys are computed.
    linear, attention: matmul FLOPs; overhead: IPCV reconstruction run inside this block.
    """

    index: int
    kind: str
    query_rows: int
    key_rows: int
    linear: float
    attention: float
    overhead: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.overhead


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one tower forward.

    total: everything below summed. per_block: ``blocks[i].total``. blocks: per-block detail.
    planning: IPCV's selection + neighbour search (0 unpatched). restoration: the final NGR (0
    unpatched). embed, merger: patch embedding and PatchMerger (0 when their sizes were not given).
    core: matmul FLOPs only (``total`` minus IPCV's overhead). overhead: planning + every NGR.
    tokens: rows entering the tower. kept_tokens: rows after pruning (``tokens`` unpatched).
    """

    total: float
    per_block: tuple[float, ...]
    blocks: tuple[BlockFlops, ...]
    planning: float
    restoration: float
    embed: float
    merger: float
    core: float
    overhead: float
    tokens: int
    kept_tokens: int


def _items(seq_lens: Sequence[int | Sequence[int]]) -> list[list[int]]:
    if isinstance(seq_lens, (str, bytes)) or not isinstance(seq_lens, Sequence) or len(seq_lens) == 0:
        raise TypeError("seq_lens must be a non-empty list of ints (images) or of lists of ints (videos)")
    items = []
    for entry in seq_lens:
        segments = [entry] if isinstance(entry, int) else list(entry)
        if not segments:
            raise ValueError("seq_lens: an item needs at least one segment")
        for length in segments:
            check_int("seq_lens", length, low=1)
        items.append(segments)
    return items


def _padding(padding: Sequence[int | Sequence[int]] | None, items: list[list[int]]) -> list[list[int]]:
    """Padding rows per segment of every item, shaped like ``_items(seq_lens)`` (zeros for ``None``)."""
    if padding is None:
        return [[0] * len(item) for item in items]
    if isinstance(padding, (str, bytes)) or not isinstance(padding, Sequence) or len(padding) != len(items):
        raise ValueError(f"padding must give one entry per item of seq_lens ({len(items)}), got {padding!r}")
    pads = []
    for entry, item in zip(padding, items, strict=True):
        rows = [entry] if isinstance(entry, int) else list(entry)
        if len(rows) != len(item):
            raise ValueError(f"padding must give one count per segment of seq_lens, got {entry!r} for {item}")
        for count in rows:
            check_int("padding", count, low=0)
        pads.append(rows)
    return pads


def _last_read(read_blocks: Sequence[int], depth: int) -> int:
    """The last block read (``-1``: only the embeddings are read)."""
    if isinstance(read_blocks, (str, bytes)) or not isinstance(read_blocks, Sequence) or len(read_blocks) == 0:
        raise TypeError(f"read_blocks must be a non-empty list of block indices, got {read_blocks!r}")
    for block in read_blocks:
        check_int("read_blocks", block, low=-1, high=depth)
    return max(read_blocks)


def _block_linear(query_rows: float, key_rows: float, width: int, mlp_hidden: int) -> float:
    """``W_q`` + output projection + MLP on the query rows, ``W_k, W_v`` on the key rows."""
    return 2.0 * (query_rows * (2 * width * width + 2 * width * mlp_hidden) + key_rows * 2 * width * width)


def grid_seq_lens(grid_thw: Sequence[Sequence[int]]) -> list[int | list[int]]:
    """``seq_lens`` for Qwen2-VL ``grid_thw`` rows: an image ``h * w``, a video ``[h * w] * t``."""
    items: list[int | list[int]] = []
    for t, h, w in grid_thw:
        t, h, w = int(t), int(h), int(w)
        items.append(h * w if t == 1 else [h * w] * t)
    return items


def vit_flops(
    depth: int,
    width: int,
    mlp_hidden: int,
    num_heads: int,
    seq_lens: Sequence[int | Sequence[int]],
    config: IPCVConfig | None = None,
    *,
    as_queries: str | None = None,
    patch_dim: int | None = None,
    merger_out: int | None = None,
    spatial_merge: int = 2,
    pinned_per_segment: int = 0,
    padding: Sequence[int | Sequence[int]] | None = None,
    read_blocks: Sequence[int] | None = None,
) -> FlopReport:
    """FLOPs of one forward of a ``depth``-block pre-norm ViT, unpatched or with IPCV.

    Args:
        depth, width, mlp_hidden, num_heads: the tower's blocks (``num_heads`` is checked to divide
            ``width``; attention FLOPs do not depend on it).
        seq_lens: one entry per item (``grid_thw`` row): an int for a one-segment item (image), or
            the segment lengths of a multi-segment item (a video's frames). See ``grid_seq_lens``.
        config: IPCV settings, or ``None`` for the unpatched tower.
        as_queries: ``"kept"`` or ``"all"`` for the stabilisation blocks; ``None`` takes
            ``config.as_queries``.
        patch_dim: ``C * T * p * p`` of the patch embedding; ``None`` leaves it out.
        merger_out: PatchMerger output width; ``None`` leaves the merger out.
        spatial_merge: PatchMerger's spatial merge size ``s``.
        pinned_per_segment: rows of every segment that IPCV never drops (a tile's CLS token): they
            do not count in an item's ``n`` (the keep count is over the other rows), are always
            kept, and are never neighbours.
        padding: padding rows of every segment, shaped like ``seq_lens`` (``None``: none). Pinned
            like ``pinned_per_segment`` rows (they are patches, so they are embedded), keys only
            before ``P`` (see the module docstring).
        read_blocks: the blocks whose outputs are read (``engine.read_blocks`` of LLaVA's
            ``vision_feature_layer``; ``-1`` reads the embeddings only); ``None``: the last block.
            Blocks after the last one read are not counted.

    Returns:
        A ``FlopReport``; the module docstring gives every formula.
    """
    check_int("depth", depth, low=1)
    check_int("width", width, low=1)
    check_int("mlp_hidden", mlp_hidden, low=1)
    check_int("num_heads", num_heads, low=1)
    if width % num_heads:
        raise ValueError(f"num_heads must divide width ({width}), got {num_heads}")
    if config is not None and not isinstance(config, IPCVConfig):
        raise TypeError(f"config must be an IPCVConfig or None, got {type(config).__name__}")
    if as_queries is not None:
        check_choice("as_queries", as_queries, AS_QUERIES)
    check_int("pinned_per_segment", pinned_per_segment, low=0)
    items = _items(seq_lens)
    pads = _padding(padding, items)
    segments = [length for item in items for length in item]
    pad_segments = [rows for item in pads for rows in item]
    tokens, pad_total = sum(segments), sum(pad_segments)
    run = depth if read_blocks is None else _last_read(read_blocks, depth) + 1  # blocks computed
    full_linear = _block_linear(tokens, tokens, width, mlp_hidden)
    full_attention = 4.0 * width * sum(length * length for length in segments)

    embedded = tokens - pinned_per_segment * len(segments)  # pinned rows (CLS) are not patches
    embed = 2.0 * embedded * patch_dim * width if patch_dim is not None else 0.0
    merged_width = spatial_merge * spatial_merge * width
    merger = (
        2.0 * (tokens / spatial_merge**2) * merged_width * (merged_width + merger_out)
        if merger_out is not None
        else 0.0
    )

    def report(blocks: list[BlockFlops], planning: float, restoration: float, kept_tokens: int) -> FlopReport:
        per_block = tuple(b.total for b in blocks)
        overhead = planning + restoration + sum(b.overhead for b in blocks)
        total = sum(per_block) + planning + restoration + embed + merger
        return FlopReport(
            total,
            per_block,
            tuple(blocks),
            planning,
            restoration,
            embed,
            merger,
            total - overhead,
            overhead,
            tokens,
            kept_tokens,
        )

    def full_block(index: int) -> BlockFlops:
        return BlockFlops(index, "full", tokens, tokens, full_linear, full_attention, 0.0)

    if config is not None:
        config.check_depth(depth)
    if config is None or config.prune_layer >= run:  # unpatched, or no block from P on runs
        return report([full_block(i) for i in range(run)], 0.0, 0.0, tokens)

    mode = as_queries if as_queries is not None else config.as_queries
    # Items as IPCV sees them: scopes "global" and "authors" make the whole packed input one item.
    competing = items if config.scope == "image" else [segments]
    kept_segments: list[float] = []
    planning = 3.0 * tokens * width
    ngr = 0.0
    kept_tokens = 0
    competing_pads = pads if config.scope == "image" else [pad_segments]
    for item, item_pads in zip(competing, competing_pads, strict=True):
        pinned = [pinned_per_segment + rows for rows in item_pads]
        free = sum(item) - sum(pinned)
        if any(p > length for p, length in zip(pinned, item, strict=True)):
            raise ValueError("pinned_per_segment and padding must not exceed a segment's length")
        kept_free = keep_count(free, config.ratio) if free else 0
        dropped = free - kept_free
        kept_tokens += kept_free + sum(pinned)
        # Kept rows spread over the item's segments in proportion (exact for one segment).
        kept_segments += [
            p + (kept_free * (length - p) / free if free else 0.0) for p, length in zip(pinned, item, strict=True)
        ]
        if dropped:
            planning += 2.0 * dropped * kept_free * width + 2.0 * width * (dropped + kept_free)
            ngr += kept_free * width + dropped * (min(config.num_neighbors, kept_free) + 2) * width

    # From P on, padding rows are no keys: key rows and key segments leave them out.
    keys = tokens - pad_total
    key_segments = [length - rows for length, rows in zip(segments, pad_segments, strict=True)]
    kept_keys = [q - rows for q, rows in zip(kept_segments, pad_segments, strict=True)]
    stabilisation_end = config.stabilisation_end(depth)
    blocks = []
    for index in range(run):
        if index < config.prune_layer:
            blocks.append(full_block(index))
        elif index < stabilisation_end and mode == "all":
            attention = 4.0 * width * sum(q * k for q, k in zip(segments, key_segments, strict=True))
            linear = _block_linear(tokens, keys, width, mlp_hidden)
            blocks.append(BlockFlops(index, "stabilised_all", tokens, keys, linear, attention, ngr))
        elif index < stabilisation_end:
            attention = 4.0 * width * sum(q * k for q, k in zip(kept_segments, key_segments, strict=True))
            linear = _block_linear(kept_tokens, keys, width, mlp_hidden)
            blocks.append(BlockFlops(index, "stabilised", kept_tokens, keys, linear, attention, ngr))
        else:
            attention = 4.0 * width * sum(q * k for q, k in zip(kept_segments, kept_keys, strict=True))
            linear = _block_linear(kept_tokens, kept_tokens - pad_total, width, mlp_hidden)
            blocks.append(BlockFlops(index, "pruned", kept_tokens, kept_tokens - pad_total, linear, attention, 0.0))
    # The last block restores the full sequence; with read layers, every read block from P on does.
    restorations = 1 if read_blocks is None else sum(config.prune_layer <= b < run for b in set(read_blocks))
    return report(blocks, planning, ngr * restorations, kept_tokens)


def qwen2_vl_flops(
    vision_config: Any,
    grid_thw: Sequence[Sequence[int]],
    config: IPCVConfig | None = None,
    *,
    as_queries: str | None = None,
) -> FlopReport:
    """``vit_flops`` for a ``Qwen2VLVisionConfig`` (read by attribute) and ``grid_thw`` rows,
    including the patch embedding and the PatchMerger."""
    c = vision_config
    return vit_flops(
        c.depth,
        c.embed_dim,
        int(c.embed_dim * c.mlp_ratio),
        c.num_heads,
        grid_seq_lens(grid_thw),
        config,
        as_queries=as_queries,
        patch_dim=c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size,
        merger_out=c.hidden_size,
        spatial_merge=c.spatial_merge_size,
    )


def qwen2_5_window_lengths(t: int, h: int, w: int, merge: int, window: int) -> list[int]:
    """Qwen2.5-VL's attention windows of one ``grid_thw`` row: ``window x window`` merge units from
    the top-left corner of every frame, the last row / column of windows cut by the grid."""
    rows = [min(window, h // merge - r) for r in range(0, h // merge, window)]
    cols = [min(window, w // merge - c) for c in range(0, w // merge, window)]
    return [r * c * merge * merge for _ in range(t) for r in rows for c in cols]


def qwen2_5_vl_flops(
    vision_config: Any, grid_thw: Sequence[Sequence[int]], config: IPCVConfig | None = None
) -> FlopReport:
    """``vit_flops`` for a ``Qwen2_5_VLVisionConfig``: blocks in ``fullatt_block_indexes`` attend
    per image / frame, the others per window; the gated MLP's three matrices count as a two-matrix
    MLP of 1.5 x ``intermediate_size``. Same conventions as ``qwen2_vl_flops`` otherwise."""
    c = vision_config
    merge = c.spatial_merge_size
    window = c.window_size // merge // c.patch_size

    def report(seq_lens: list[Any]) -> FlopReport:
        return vit_flops(
            c.depth,
            c.hidden_size,
            int(1.5 * c.intermediate_size),
            c.num_heads,
            seq_lens,
            config,
            patch_dim=c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size,
            merger_out=c.out_hidden_size,
            spatial_merge=merge,
        )

    full = report(grid_seq_lens(grid_thw))
    windowed = report([qwen2_5_window_lengths(int(t), int(h), int(w), merge, window) for t, h, w in grid_thw])
    blocks = tuple(full.blocks[i] if i in c.fullatt_block_indexes else windowed.blocks[i] for i in range(c.depth))
    ipcv_only = full.planning + full.restoration
    overhead = ipcv_only + sum(b.overhead for b in blocks)
    total = sum(b.total for b in blocks) + ipcv_only + full.embed + full.merger
    return replace(
        full,
        total=total,
        per_block=tuple(b.total for b in blocks),
        blocks=blocks,
        core=total - overhead,
        overhead=overhead,
    )


def qwen3_vl_flops(
    vision_config: Any, grid_thw: Sequence[Sequence[int]], config: IPCVConfig | None = None
) -> FlopReport:
    """``vit_flops`` for a ``Qwen3VLVisionConfig``: Qwen2-VL's conventions, with the merger counted
    once more per DeepStack merger (each sees the restored full sequence, like the final one; a
    Qwen3.5 tower has none). Position-embedding interpolation (elementwise) is not counted."""
    c = vision_config
    flops = vit_flops(
        c.depth,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        grid_seq_lens(grid_thw),
        config,
        patch_dim=c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size,
        merger_out=c.out_hidden_size,
        spatial_merge=c.spatial_merge_size,
    )
    deepstack = len(getattr(c, "deepstack_visual_indexes", None) or ()) * flops.merger
    return replace(flops, total=flops.total + deepstack, merger=flops.merger + deepstack, core=flops.core + deepstack)


def glm4v_flops(vision_config: Any, grid_thw: Sequence[Sequence[int]], config: IPCVConfig | None = None) -> FlopReport:
    """``vit_flops`` for a ``Glm4vVisionConfig`` (GLM-4.1V / 4.5V / 4.6V) and ``grid_thw`` rows.

    Blocks: width ``hidden_size``, a gated MLP of width ``out_hidden_size`` (three matrices, counted
    as a two-matrix MLP of 1.5 x ``out_hidden_size``). After the tower, per merge unit of ``m^2``
    tokens: the ``downsample`` convolution ``m^2 * hidden_size -> out_hidden_size`` and the merger
    (``proj`` ``O x O``, gated MLP ``O -> intermediate_size -> O``), counted as ``merger``. The
    patch embedding is counted; RMSNorms and position-embedding resampling (elementwise) are not.
    """
    c = vision_config
    merge = c.spatial_merge_size
    flops = vit_flops(
        c.depth,
        c.hidden_size,
        int(1.5 * c.out_hidden_size),
        c.num_heads,
        grid_seq_lens(grid_thw),
        config,
        patch_dim=c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size,
        spatial_merge=merge,
    )
    out, context = c.out_hidden_size, c.intermediate_size
    units = flops.tokens / merge**2  # every token is restored before the downsampling
    merger = 2.0 * units * (merge**2 * c.hidden_size * out + out * out + 3 * out * context)
    return replace(flops, total=flops.total + merger, merger=merger, core=flops.core + merger)


def internvl_flops(
    vision_config: Any,
    tiles_per_image: Sequence[int],
    config: IPCVConfig | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    read_blocks: Sequence[int] | None = None,
) -> FlopReport:
    """``vit_flops`` for an ``InternVLVisionConfig`` (InternViT): every tile is one attention
    segment of ``1 + N`` rows (its CLS token, pinned, and ``N`` patches), the tiles of an image one
    item; with the patch embedding (the projector lies outside the tower).

    Args:
        tiles_per_image: tiles of every image, in order.
        image_size: ``(height, width)`` of a tile in pixels; ``None``: the config's ``image_size``.
        read_blocks: the blocks the model reads (``vit_flops``); ``None``: the last one.
    """
    c = vision_config
    patch_h, patch_w = c.patch_size if isinstance(c.patch_size, (list, tuple)) else (c.patch_size,) * 2
    if image_size is None:
        image_size = tuple(c.image_size) if isinstance(c.image_size, (list, tuple)) else (c.image_size,) * 2
    patches = (image_size[0] // patch_h) * (image_size[1] // patch_w)
    if config is not None and config.scope == "authors":
        # The authors' InternVL selects per tile: every tile an item of its own. (Their neighbour
        # search spans the call, which this counts per tile: a slight undercount of planning.)
        tiles_per_image, config = [1] * sum(tiles_per_image), replace(config, scope="image")
    return vit_flops(
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        [[1 + patches] * tiles if tiles > 1 else 1 + patches for tiles in tiles_per_image],
        config,
        patch_dim=c.num_channels * patch_h * patch_w,
        pinned_per_segment=1,
        read_blocks=read_blocks,
    )


def clip_vit_flops(
    vision_config: Any,
    crops_per_image: Sequence[int],
    config: IPCVConfig | None = None,
    *,
    read_blocks: Sequence[int] | None = None,
) -> FlopReport:
    """``vit_flops`` for a ``CLIPVisionConfig`` / ``SiglipVisionConfig`` tower: every crop is one
    attention segment of ``(image_size / patch_size)^2`` patches (plus CLIP's CLS token, pinned),
    the crops of an image one item; with the patch embedding. Heads (pooling, post-norm) are
    elementwise or one token and not counted.

    Args:
        crops_per_image: crops of every image, in order (``[1] * B`` for a bare tower's batch;
            a LLaVA-NeXT / OneVision image: its base crop and anyres crops).
        read_blocks: the blocks the model reads (``vit_flops``; LLaVA's ``vision_feature_layer``
            -2 reads block ``depth - 2``, and the last block is not run); ``None``: the last one.
    """
    c = vision_config
    cls = int(getattr(c, "model_type", "") == "clip_vision_model")
    length = (c.image_size // c.patch_size) ** 2 + cls
    return vit_flops(
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        [[length] * crops if crops > 1 else length for crops in crops_per_image],
        config,
        patch_dim=c.num_channels * c.patch_size * c.patch_size,
        pinned_per_segment=cls,
        read_blocks=read_blocks,
    )


def idefics3_flops(
    vision_config: Any,
    padding_per_image: Sequence[Sequence[int]],
    config: IPCVConfig | None = None,
) -> FlopReport:
    """``vit_flops`` for an ``Idefics3VisionConfig`` / ``SmolVLMVisionConfig`` tower (SigLIP
    blocks, no CLS): every sub-image is one attention segment of ``(image_size / patch_size)^2``
    patches, the sub-images of an image one item, and the patches that ``patch_attention_mask``
    marks as padding are ``vit_flops``' padding rows: pinned (kept, not in the item's ``n``,
    never neighbours), keys only in the blocks before ``P``. With the patch embedding, which
    embeds every patch (padding included); the post-norm is elementwise and not counted.

    Args:
        padding_per_image: for every image, the padding patches of each of its sub-images (its
            length is the image's sub-image count; ``[[0]] * B`` for a bare tower's batch).
    """
    c = vision_config
    length = (c.image_size // c.patch_size) ** 2
    if isinstance(padding_per_image, (str, bytes)) or not isinstance(padding_per_image, Sequence):
        raise TypeError(f"padding_per_image must be a list of lists of ints, got {padding_per_image!r}")
    for image in padding_per_image:
        if isinstance(image, (str, bytes)) or not isinstance(image, Sequence) or len(image) == 0:
            raise ValueError(f"padding_per_image: every image needs its sub-images' padding counts, got {image!r}")
    return vit_flops(
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        [[length] * len(image) if len(image) > 1 else length for image in padding_per_image],
        config,
        patch_dim=c.num_channels * c.patch_size * c.patch_size,
        padding=[list(image) if len(image) > 1 else int(image[0]) for image in padding_per_image],
    )


def pixtral_flops(
    vision_config: Any,
    grid_thw: Sequence[Sequence[int]],
    config: IPCVConfig | None = None,
    *,
    read_blocks: Sequence[int] | None = None,
) -> FlopReport:
    """``vit_flops`` for a ``PixtralVisionConfig`` tower (Pixtral, Mistral 3): every ``(1, h, w)``
    row is one image of ``h x w`` patches, one item and one attention segment; with the patch
    embedding. The gated MLP's three matrices count as a two-matrix MLP of 1.5 x
    ``intermediate_size``. The patch merger and projector after the tower (Mistral 3) are the
    model's, not counted.

    Args:
        read_blocks: the blocks the model reads (``vision_feature_layer``); ``None``: the last one.
    """
    c = vision_config
    return vit_flops(
        c.num_hidden_layers,
        c.hidden_size,
        int(1.5 * c.intermediate_size),
        c.num_attention_heads,
        grid_seq_lens(grid_thw),
        config,
        patch_dim=c.num_channels * c.patch_size * c.patch_size,
        read_blocks=read_blocks,
    )


def predicted_speedup(unpatched: FlopReport, patched: FlopReport, *, include_overhead: bool = True) -> float:
    """The FLOP model's bound on the speedup: ``unpatched.total / patched.total``.

    ``include_overhead=False`` compares matmul FLOPs only (``core``), which is exactly 1.0 at
    ``ratio = 0``.
    """
    if not isinstance(unpatched, FlopReport) or not isinstance(patched, FlopReport):
        raise TypeError("unpatched and patched must be FlopReport instances (from vit_flops)")
    if include_overhead:
        return unpatched.total / patched.total
    return unpatched.core / patched.core


def gemma4_flops(
    vision_config: Any,
    patches_per_image: Sequence[Sequence[int]],
    config: IPCVConfig | None = None,
) -> FlopReport:
    """``vit_flops`` for a ``Gemma4VisionConfig`` tower: every image is one row of a padded batch,
    one attention segment of ``length`` patch rows, of which ``length - real`` are padding rows
    (``pixel_position_ids == -1``): ``vit_flops``' padding rows, pinned, keys only before ``P``.
    The MLP is gated (three ``D x M`` matrices), counted as a two-matrix MLP of hidden ``3M / 2``.
    With the patch embedding (every row, padding included). Not counted: the q / k / v and sandwich
    RMS norms and rotary (element-wise), and the pooler's position-averaging (a one-hot matmul of
    ``2 (L / k^2) L D``, under 0.2% of the tower at Gemma 4's sizes, identical with and without IPCV).

    Args:
        patches_per_image: ``(length, real)`` of every image (or video frame), in batch order:
            its padded row length and its real patches.

    Raises:
        ValueError: a tower whose attention width is not ``hidden_size`` or with grouped key /
            value heads (the FLOP model counts ``W_k, W_v`` as ``D x D``), or a bad image entry.
    """
    c = vision_config
    if c.num_attention_heads * c.head_dim != c.hidden_size or c.num_key_value_heads != c.num_attention_heads:
        raise ValueError(
            "vision_config: the FLOP model needs num_attention_heads * head_dim == hidden_size and "
            f"num_key_value_heads == num_attention_heads, got {c.num_attention_heads} x {c.head_dim} heads, "
            f"{c.num_key_value_heads} key/value heads, hidden_size {c.hidden_size}"
        )
    if isinstance(patches_per_image, (str, bytes)) or not isinstance(patches_per_image, Sequence):
        raise TypeError(f"patches_per_image must be a list of (length, real) pairs, got {patches_per_image!r}")
    lengths, padding = [], []
    for image in patches_per_image:
        if isinstance(image, (str, bytes)) or not isinstance(image, Sequence) or len(image) != 2:
            raise ValueError(f"patches_per_image: every image needs (length, real), got {image!r}")
        length, real = image
        check_int("patches_per_image length", length, low=1)
        check_int("patches_per_image real", real, low=1, high=length + 1)
        lengths.append(length)
        padding.append(length - real)
    if 3 * c.intermediate_size % 2:
        raise ValueError(f"vision_config.intermediate_size must be even, got {c.intermediate_size}")
    return vit_flops(
        c.num_hidden_layers,
        c.hidden_size,
        3 * c.intermediate_size // 2,
        c.num_attention_heads,
        lengths,
        config,
        patch_dim=3 * c.patch_size * c.patch_size,
        padding=padding,
    )


def kimi_k25_flops(
    vision_config: Any, grid_thw: Sequence[Sequence[int]], config: IPCVConfig | None = None
) -> FlopReport:
    """``vit_flops`` for a ``Kimi_K25VisionConfig`` (MoonViT) and ``grid_thw`` rows: one attention
    segment per row (a clip's ``t`` frames attend to each other), the 2-D patch embedding
    (``3 * p * p``), no merger (the tower only averages each 2 x 2 window over the clip's frames, an
    elementwise step, and the projector lies outside the tower)."""
    c = vision_config
    return vit_flops(
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        [int(t) * int(h) * int(w) for t, h, w in grid_thw],
        config,
        patch_dim=3 * c.patch_size * c.patch_size,
    )


def onevision1_5_flops(
    vision_config: Any, grid_thw: Sequence[Sequence[int]], config: IPCVConfig | None = None
) -> FlopReport:
    """``vit_flops`` for a ``LlavaOnevision15VisionConfig`` (RICE-ViT) and ``grid_thw`` rows: one
    segment of ``h * w + 1`` rows per image or frame (its CLS row, pinned, then its patches), the
    patch embedding ``C * p * p`` (no temporal patches), and Qwen2-VL's PatchMerger on the patch
    rows (the tower drops the CLS rows before it; the model counts it over all rows, CLS rows
    included, an over-count of ``1 / (h * w)``). The CLS rows' own embedding (elementwise) is not
    counted."""
    c = vision_config
    return vit_flops(
        c.depth,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        [[int(h) * int(w) + 1] * int(t) for t, h, w in grid_thw],
        config,
        patch_dim=c.in_channels * c.patch_size * c.patch_size,
        merger_out=c.out_hidden_size,
        spatial_merge=c.spatial_merge_size,
        pinned_per_segment=1,
    )


def minicpmv_flops(
    vision_config: Any,
    grid_thw: Sequence[Sequence[int]],
    config: IPCVConfig | None = None,
    *,
    merged: bool = True,
) -> FlopReport:
    """FLOPs of one call of a ``MiniCPMV4_6VisionConfig`` tower (MiniCPM-V 4.6 / 4.7; spec §5.14):
    every ``(1, h, w)`` row is one slice of ``h x w`` patches, one item and one attention segment.

    Blocks ``0 .. I`` (``I = insert_layer_id``) run on every patch (``vit_flops`` unpatched, with
    the patch embedding); the window-attention merger after block ``I`` (``q/k/v/out`` projections
    and attention within each 2 x 2 window over the ``n`` rows, then its MLP ``4D -> 4M -> D`` on
    the ``n / 4`` windows) counts as ``merger``; blocks ``I + 1 ..`` run on the ``(h / 2)(w / 2)``
    merged tokens of each slice, with IPCV from ``P`` on (``config.prune_layer >= I + 2``).
    ``merged=False`` (the model's ``"4x"`` mode): no merge, plain ``vit_flops``. The model's
    ``Merger`` and projector after the tower are not counted.

    Raises:
        ValueError: a slice with an odd side (it cannot be merged), or a prune layer at or before
            ``I + 1``.
    """
    c = vision_config
    depth, width, mlp, heads = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads
    patch_dim = c.num_channels * c.patch_size * c.patch_size
    full = [int(h) * int(w) for _, h, w in grid_thw]
    insert = int(c.insert_layer_id)
    if not merged or insert < 0:
        return vit_flops(depth, width, mlp, heads, full, config, patch_dim=patch_dim)
    for _, h, w in grid_thw:
        if int(h) % 2 or int(w) % 2:
            raise ValueError(f"grid_thw: a slice of {h} x {w} patches cannot be merged 2 x 2")
    if config is not None and config.prune_layer < insert + 2:
        raise ValueError(f"prune_layer must be >= insert_layer_id + 2 = {insert + 2}, got {config.prune_layer}")
    before = vit_flops(insert + 1, width, mlp, heads, full, None, patch_dim=patch_dim)
    after = vit_flops(depth, width, mlp, heads, [n // 4 for n in full], config)
    tokens = sum(full)
    # Attention within 4-row windows and its q / k / v / out projections, then the MLP per window.
    window = 4.0 * width * tokens * 4 + 8.0 * tokens * width * width
    merger = window + 2.0 * (tokens / 4) * (4 * width * 4 * mlp + 4 * mlp * width)
    blocks = before.blocks + after.blocks[insert + 1 :]
    per_block = tuple(b.total for b in blocks)
    total = sum(per_block) + after.planning + after.restoration + before.embed + merger
    return FlopReport(
        total,
        per_block,
        blocks,
        after.planning,
        after.restoration,
        before.embed,
        merger,
        total - after.overhead,
        after.overhead,
        tokens,
        after.kept_tokens,
    )


def llama4_flops(
    vision_config: Any,
    tiles_per_image: Sequence[int],
    config: IPCVConfig | None = None,
    *,
    read_blocks: Sequence[int] | None = None,
) -> FlopReport:
    """``vit_flops`` for a ``Llama4VisionConfig``: every tile is one attention segment of ``N + 1``
    rows (``N`` patches and its CLS token, pinned), the tiles of an image one item; with the patch
    embedding and, as the ``merger``, the tower's pixel-shuffle adapter MLP (``N / 4`` rows of
    ``intermediate_size`` per tile through ``fc1`` to ``projector_input_dim`` and ``fc2`` to
    ``projector_output_dim``), which sees every restored row. ``scope="authors"`` is ``"global"``.

    Args:
        tiles_per_image: tiles of every image, in order.
        read_blocks: the blocks the model reads (``vit_flops``); ``None``: the last one.
    """
    c = vision_config
    if config is not None and config.scope == "authors":
        config = replace(config, scope="global")
    patches = (c.image_size // c.patch_size) ** 2
    report = vit_flops(
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        [[patches + 1] * tiles if tiles > 1 else patches + 1 for tiles in tiles_per_image],
        config,
        patch_dim=c.num_channels * c.patch_size * c.patch_size,
        pinned_per_segment=1,
        read_blocks=read_blocks,
    )
    rows = sum(tiles_per_image) * patches * c.pixel_shuffle_ratio**2
    adapter = 2.0 * rows * (c.intermediate_size * c.projector_input_dim + c.projector_output_dim**2)
    return replace(report, total=report.total + adapter, merger=report.merger + adapter, core=report.core + adapter)
