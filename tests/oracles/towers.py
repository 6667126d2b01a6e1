"""A naive float64 IPCV oracle for the Qwen2.5-VL / Qwen3-VL / InternVL towers (their tiny builders
live in ``ipcv_kernels.testing.models`` and are re-exported here).

The oracle shares no code with ``ipcv_kernels``. It runs the unpatched tower once to record what
the tower hands each block (block 0's input, and every block's segments / rotary tables), then
applies the spec (docs/spec.md) step by step with plain Python loops: per-item scores and top-k, neighbours
by direct distance, NGR by explicit means, attention-stabilisation blocks as the model's own block
on the full reconstructed sequence (kept rows read back), pruned blocks as the model's own block on
the kept tokens of each segment (segments shrunk by counting; InternViT: tile by tile). Finally it
runs the unpatched tower again with every block from ``P`` on replaced by the oracle's restored
full sequence, so the tower's own head (merger, window-order inversion, DeepStack taps, final
norm) produces the expected outputs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipcv_kernels.families import build_model, build_tower

# The builders are re-exported: the model tests import them from here, beside the oracle.
from ipcv_kernels.testing.models import internvl_inputs, internvl_tiles, sample_pixels

__all__ = ["build_model", "build_tower", "internvl_inputs", "internvl_tiles", "ipcv_tower_oracle", "tower_call"]


# -- the oracle ---------------------------------------------------------------------------------
@dataclass
class OracleResult:
    full: list[torch.Tensor]  # [depth] restored full sequence (packed rows) after every block >= P
    output: Any  # the tower's output with the oracle's sequences fed to its head


def _blocks(tower: nn.Module) -> nn.ModuleList:
    if hasattr(tower, "vision_adapter"):
        return tower.model.layers  # Llama 4
    if hasattr(tower, "transformer"):
        return tower.transformer.layers  # Pixtral
    if not hasattr(tower, "encoder"):
        return tower.layers if hasattr(tower, "final_layernorm") else tower.blocks  # Kimi-K2.5; the Qwen towers
    return tower.encoder.layer if hasattr(tower.encoder, "layer") else tower.encoder.layers  # InternViT / CLIP


def _record_block_calls(tower: nn.Module, call) -> list[tuple[tuple, dict]]:
    calls: list[tuple[tuple, dict]] = []

    def record(module, args, kwargs):
        kwargs = dict(kwargs)
        if not args and "hidden_state" in kwargs:  # Llama 4's encoder passes it by name
            args = (kwargs.pop("hidden_state"),)
        calls.append((args, kwargs))

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in _blocks(tower)]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _shrunk(cu_seqlens: list[int], kept_positions: list[int]) -> list[int]:
    """Segment offsets over the kept tokens, counted one by one; empty segments left out."""
    offsets, count = [0], 0
    for s0, s1 in itertools.pairwise(cu_seqlens):
        inside = sum(1 for j in kept_positions if s0 <= j < s1)
        if inside:
            count += inside
            offsets.append(count)
    return offsets


def ipcv_tower_oracle(
    tower: nn.Module,
    call,
    items: list[int],
    *,
    prune_layer: int,
    ratio: float,
    as_layers: int,
    num_neighbors: int,
    pinned: set[int] = frozenset(),
    key_padding: set[int] = frozenset(),
    neighbors_from_call: bool = False,
    score_fn=None,
) -> OracleResult:
    """The spec's IPCV forward of ``tower`` (unpatched, float64) for ``call()``, a tower call.

    Args:
        items: token count of every item, in packing order (one entry for global scope).
        pinned: token positions never dropped and never neighbours (InternViT's CLS tokens); they
            do not count in an item's keep count.
        num_neighbors: ``0`` reconstructs nothing: every dropped token keeps its block-``P``
            state (the naive baseline, ``IPCVConfig(reconstruct=False)``).
        neighbors_from_call: neighbours are any kept row of the call, pinned ones included, not
            only the chosen rows of the dropped token's item (InternVL as its authors ran it:
            ``items`` are then the tiles).
        score_fn: ``score_fn(x_before, x_after) -> [n]`` scores of every packed row (a selector's
            reference; higher kept), from block ``P-1``'s input and output; ``None``: the spec's
            ``||x_after - x_before||``.
        key_padding: positions that never serve as keys (Idefics3's padding patches, also
            ``pinned``): the model's own mask covers the full-sequence blocks; the pruned blocks
            get an additive mask over each sequence's kept rows (batched towers only).
    """
    blocks = _blocks(tower)
    depth = len(blocks)
    calls = _record_block_calls(tower, call)
    # MiniCPM-V: blocks take every slice as one sequence [1, n, D] with cu_seqlens, and merge 2 x 2
    # inside the tower (after block insert_layer_id < P - 1): block shapes differ before and after.
    packed_batch = hasattr(tower, "vit_merger")
    # InternViT, CLIP, SigLIP, Llama 4: blocks take [sequences, L, D]
    batched = (hasattr(tower, "encoder") or hasattr(tower, "vision_adapter")) and not packed_batch
    # Pixtral: blocks take every image as one sequence [1, n, D] with a block-diagonal mask.
    one_sequence = hasattr(tower, "transformer")
    layout = calls[0][0][0].shape
    layouts = [args[0].shape for args, _ in calls]
    width = layout[-1]

    def image_of(mask: torch.Tensor) -> list[int]:
        """Each row's image under a block-diagonal mask: the first column it may attend to."""
        allowed = mask[0, 0] == 0
        return [int(allowed[j].nonzero()[0]) for j in range(allowed.shape[0])]

    def block(i: int, *args, **kwargs) -> torch.Tensor:
        """Block ``i``'s output (Llama 4's blocks return a one-element tuple)."""
        output = blocks[i](*args, **kwargs)
        return output[0] if isinstance(output, tuple) else output

    def run_full(i: int, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = calls[i]
        if batched or one_sequence or packed_batch:
            return block(i, x.view(layouts[i]), *args[1:], **kwargs).reshape(-1, width)
        return blocks[i](x, *args[1:], **kwargs)

    def run_kept(i: int, keep: list[int], h: torch.Tensor) -> torch.Tensor:
        if packed_batch:  # the model's own block on the kept rows [1, Nk, D], segments shrunk
            args, kwargs = calls[i]
            kwargs = dict(kwargs)
            offsets = _shrunk(kwargs["cu_seqlens"].tolist(), keep)
            kwargs["cu_seqlens"] = torch.tensor(offsets, dtype=kwargs["cu_seqlens"].dtype)
            if kwargs.get("max_seqlen") is not None:
                kwargs["max_seqlen"] = max(b - a for a, b in itertools.pairwise(offsets))
            return blocks[i](h[None], *args[1:], **kwargs)[0]
        if one_sequence:  # the model's own block, image by image, on that image's kept rows alone
            args, kwargs = calls[i]
            image = image_of(args[1])
            cos, sin = kwargs["position_embeddings"]
            out = torch.empty_like(h)
            for first in sorted(set(image)):
                rows = [r for r, j in enumerate(keep) if image[j] == first]
                if rows:
                    positions = [keep[r] for r in rows]
                    rotary = (cos[positions], sin[positions])
                    out[rows] = blocks[i](h[rows][None], None, position_embeddings=rotary)[0]
            return out
        if batched:
            tile = layout[1]
            out = torch.empty_like(h)
            args, kwargs = calls[i]
            for t in range(layout[0]):
                rows = [r for r, j in enumerate(keep) if t * tile <= j < (t + 1) * tile]
                rest, call_kwargs = args[1:], dict(kwargs)
                if "attention_mask" in call_kwargs:  # Gemma 4 passes it by name (the full batch's)
                    call_kwargs["attention_mask"] = None
                if key_padding and rows:
                    masked = torch.tensor([keep[r] in key_padding for r in rows])
                    assert not masked.all(), "a sequence kept only padding: the oracle leaves that undefined"
                    mask = torch.zeros(1, 1, len(rows), len(rows), dtype=h.dtype)
                    mask[..., masked] = torch.finfo(h.dtype).min
                    if "attention_mask" in call_kwargs:
                        call_kwargs["attention_mask"] = mask
                    else:
                        rest = (mask, *args[2:])
                if "position_embeddings" in call_kwargs:  # Gemma 4: rotary tables and positions per row
                    local = [keep[r] - t * tile for r in rows]
                    cos, sin = call_kwargs["position_embeddings"]
                    call_kwargs["position_embeddings"] = (cos[t : t + 1, local], sin[t : t + 1, local])
                    call_kwargs["position_ids"] = call_kwargs["position_ids"][t : t + 1, local]
                if "freqs_ci" in call_kwargs:  # Llama 4: one complex rotary row per tile position
                    call_kwargs["freqs_ci"] = call_kwargs["freqs_ci"][[keep[r] - t * tile for r in rows]]
                out[rows] = block(i, h[rows][None], *rest, **call_kwargs)[0]
            return out
        args, kwargs = calls[i]
        kwargs = dict(kwargs)
        if "cu_seqlens" not in kwargs:  # passed positionally (LLaVA-OneVision-1.5's tower)
            kwargs["cu_seqlens"] = args[1]
        offsets = _shrunk(kwargs["cu_seqlens"].tolist(), keep)
        kwargs["cu_seqlens"] = torch.tensor(offsets, dtype=kwargs["cu_seqlens"].dtype)
        if "max_seqlen" in kwargs:
            kwargs["max_seqlen"] = max(b - a for a, b in itertools.pairwise(offsets))
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos[keep], sin[keep])
        return blocks[i](h, **kwargs)

    # MiniCPM-V: from block P - 1's recorded input, the blocks before it (and the merge) run unpatched.
    start = prune_layer - 1 if packed_batch else 0
    x = calls[start][0][0].reshape(-1, width)
    for i in range(start, prune_layer):
        x_prev, x = x, run_full(i, x)
    base = x

    item_rows, start = [], 0
    for length in items:
        item_rows.append(list(range(start, start + length)))
        start += length
    given = None if score_fn is None else score_fn(x_prev, base).tolist()
    keep, chosen_of, dropped_of = [], [], []
    for rows in item_rows:
        free = [j for j in rows if j not in pinned]
        score = {j: float((base[j] - x_prev[j]).norm()) if given is None else given[j] for j in free}
        count = max(1, int(len(free) * (1 - ratio)))
        chosen = sorted(free, key=lambda j: -score[j])[:count]
        keep += chosen + [j for j in rows if j in pinned]
        chosen_of.append(chosen)
        dropped_of.append([d for d in free if d not in chosen])
    keep.sort()
    neighbours = {}
    for chosen, dropped in zip(chosen_of, dropped_of, strict=True):
        pool = keep if neighbors_from_call else chosen
        for d in dropped:
            by_distance = sorted(pool, key=lambda m, d=d: float((base[d] - base[m]).norm()))
            neighbours[d] = by_distance[:num_neighbors]
    row = {j: r for r, j in enumerate(keep)}

    def restore(h: torch.Tensor) -> torch.Tensor:
        full = base.clone()
        for j in keep:
            full[j] = h[row[j]]
        for d, nbrs in neighbours.items():
            if nbrs:  # none (num_neighbors=0): the token keeps its block-P state
                full[d] = base[d] + sum(h[row[m]] - base[m] for m in nbrs) / len(nbrs)
        return full

    h, restored = base[keep], {}
    for i in range(prune_layer, depth):
        stabilising = i < prune_layer + as_layers
        h = run_full(i, restore(h))[keep] if stabilising else run_kept(i, keep, h)
        restored[i] = restore(h)

    def replace_output(i: int):
        def hook(module, args, output):
            full = restored[i].view(layouts[i]) if batched or one_sequence or packed_batch else restored[i]
            return (full,) if isinstance(output, tuple) else full

        return hook

    # prepend: the replaced output is what every other hook (transformers records hidden_states with
    # one) sees.
    handles = [blocks[i].register_forward_hook(replace_output(i), prepend=True) for i in restored]
    try:
        output = call()
    finally:
        for handle in handles:
            handle.remove()
    return OracleResult([restored.get(i) for i in range(depth)], output)


def tower_call(tower: nn.Module, grid: list[list[int]]):
    """A no-argument call of a Qwen-family ``tower`` on seeded random patches for ``grid`` rows."""
    pixels, grid_thw = sample_pixels(tower.config, grid, dtype=tower.dtype)
    return lambda: tower(pixels, grid_thw=grid_thw)
