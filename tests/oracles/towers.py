"""Tiny Qwen2.5-VL / Qwen3-VL / InternVL models and a naive float64 IPCV oracle for their towers.

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

from ipcv_kernels.testing.models import TINY_SPECIAL_TOKENS, TINY_TEXT, sample_pixels

QWEN2_5_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=48,
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=8,  # 2 x 2 merge units = 4 x 4 patches per window
    fullatt_block_indexes=[2, 5],
)
QWEN3_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=48,
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=[1, 3, 4],
)
QWEN3_TEXT = {
    **TINY_TEXT,
    "head_dim": 12,
    "rope_parameters": {**TINY_TEXT["rope_parameters"], "mrope_interleaved": True},
}
INTERNVL_VISION = dict(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=96,
    image_size=16,
    patch_size=4,  # 16 patches + CLS per tile
    use_qk_norm=True,
    norm_type="rms_norm",
    layer_scale_init_value=0.5,
)
INTERNVL_TEXT = {
    **{key: value for key, value in TINY_TEXT.items() if key != "rope_parameters"},  # plain Qwen2 rope
    "model_type": "qwen2",
    "num_hidden_layers": 2,
}
INTERNVL_IMAGE_TOKEN = 120
INTERNVL_TOKENS_PER_TILE = 4  # 4 x 4 patches, pixel-shuffled by 0.5


def _finish(model: nn.Module, attn: str, dtype: torch.dtype) -> nn.Module:
    for config in (model.config, *(getattr(model.config, n, None) for n in ("vision_config", "text_config"))):
        if config is not None:
            config._attn_implementation = attn
    return model.to(dtype=dtype).eval()


def _jitter(model: nn.Module, seed: int) -> None:
    """Perturb every parameter (zero-initialised ones too: CLS token, position embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


def build_tower(family: str, *, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny vision tower with seeded random weights: ``family`` in qwen2_5_vl, qwen3_vl, internvl."""
    torch.manual_seed(seed)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        tower = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**QWEN2_5_VISION))
    elif family == "qwen3_vl":
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        tower = Qwen3VLVisionModel(Qwen3VLVisionConfig(**QWEN3_VISION))
    else:
        from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
        from transformers.models.internvl.modeling_internvl import InternVLVisionModel

        tower = InternVLVisionModel(InternVLVisionConfig(**INTERNVL_VISION))
    _jitter(tower, seed)
    return _finish(tower, attn, dtype)


def build_model(family: str, *, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny full conditional-generation model of ``family`` with seeded random weights."""
    torch.manual_seed(seed)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig(
            text_config=dict(TINY_TEXT), vision_config=dict(QWEN2_5_VISION), **TINY_SPECIAL_TOKENS
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        config = Qwen3VLConfig(text_config=dict(QWEN3_TEXT), vision_config=dict(QWEN3_VISION), **TINY_SPECIAL_TOKENS)
        model = Qwen3VLForConditionalGeneration(config)
    else:
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        config = InternVLConfig(
            vision_config=dict(INTERNVL_VISION),
            text_config=dict(INTERNVL_TEXT),
            image_token_id=INTERNVL_IMAGE_TOKEN,
            image_seq_length=INTERNVL_TOKENS_PER_TILE,
        )
        model = InternVLForConditionalGeneration(config)
    _jitter(model, seed)
    return _finish(model, attn, dtype)


def internvl_inputs(model: nn.Module, tiles_per_image: list[int], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: text, then per image ``<start> <image>*(4 * tiles) <end>``, then text; and the tiles."""
    ids: list[int] = [3, 4, 5]
    for tiles in tiles_per_image:
        ids += [121, *[INTERNVL_IMAGE_TOKEN] * (INTERNVL_TOKENS_PER_TILE * tiles), 122]
    ids += [10, 11]
    input_ids = torch.tensor([ids])
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(tiles_per_image), 3, 16, 16, generator=generator).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def internvl_tiles(count: int, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 16, 16, generator=generator).to(dtype)


# -- the oracle ---------------------------------------------------------------------------------
@dataclass
class OracleResult:
    full: list[torch.Tensor]  # [depth] restored full sequence (packed rows) after every block >= P
    output: Any  # the tower's output with the oracle's sequences fed to its head


def _blocks(tower: nn.Module) -> nn.ModuleList:
    return tower.encoder.layer if hasattr(tower, "encoder") else tower.blocks


def _record_block_calls(tower: nn.Module, call) -> list[tuple[tuple, dict]]:
    calls: list[tuple[tuple, dict]] = []

    def record(module, args, kwargs):
        calls.append((args, dict(kwargs)))

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
) -> OracleResult:
    """The spec's IPCV forward of ``tower`` (unpatched, float64) for ``call()``, a tower call.

    Args:
        items: token count of every item, in packing order (one entry for global scope).
        pinned: token positions never dropped and never neighbours (InternViT's CLS tokens); they
            do not count in an item's keep count.
    """
    blocks = _blocks(tower)
    depth = len(blocks)
    calls = _record_block_calls(tower, call)
    batched = hasattr(tower, "encoder")  # InternViT: blocks take [tiles, 1 + N, D]
    layout = calls[0][0][0].shape
    width = layout[-1]

    def run_full(i: int, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = calls[i]
        if batched:
            return blocks[i](x.view(layout)).reshape(-1, width)
        return blocks[i](x, *args[1:], **kwargs)

    def run_kept(i: int, keep: list[int], h: torch.Tensor) -> torch.Tensor:
        if batched:
            tile = layout[1]
            out = torch.empty_like(h)
            for t in range(layout[0]):
                rows = [r for r, j in enumerate(keep) if t * tile <= j < (t + 1) * tile]
                out[rows] = blocks[i](h[rows][None])[0]
            return out
        _, kwargs = calls[i]
        kwargs = dict(kwargs)
        offsets = _shrunk(kwargs["cu_seqlens"].tolist(), keep)
        kwargs["cu_seqlens"] = torch.tensor(offsets, dtype=kwargs["cu_seqlens"].dtype)
        if "max_seqlen" in kwargs:
            kwargs["max_seqlen"] = max(b - a for a, b in itertools.pairwise(offsets))
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos[keep], sin[keep])
        return blocks[i](h, **kwargs)

    x = calls[0][0][0].reshape(-1, width)
    for i in range(prune_layer):
        x_prev, x = x, run_full(i, x)
    base = x

    item_rows, start = [], 0
    for length in items:
        item_rows.append(list(range(start, start + length)))
        start += length
    keep, neighbours = [], {}
    for rows in item_rows:
        free = [j for j in rows if j not in pinned]
        score = {j: float((base[j] - x_prev[j]).norm()) for j in free}
        count = max(1, int(len(free) * (1 - ratio)))
        chosen = sorted(free, key=lambda j: -score[j])[:count]
        keep += chosen + [j for j in rows if j in pinned]
        for d in free:
            if d not in chosen:
                by_distance = sorted(chosen, key=lambda m, d=d: float((base[d] - base[m]).norm()))
                neighbours[d] = by_distance[:num_neighbors]
    keep.sort()
    row = {j: r for r, j in enumerate(keep)}

    def restore(h: torch.Tensor) -> torch.Tensor:
        full = base.clone()
        for j in keep:
            full[j] = h[row[j]]
        for d, nbrs in neighbours.items():
            full[d] = base[d] + sum(h[row[m]] - base[m] for m in nbrs) / len(nbrs)
        return full

    h, restored = base[keep], {}
    for i in range(prune_layer, depth):
        stabilising = i < prune_layer + as_layers
        h = run_full(i, restore(h))[keep] if stabilising else run_kept(i, keep, h)
        restored[i] = restore(h)

    def replace_output(i: int):
        def hook(module, args, output):
            return restored[i].view(layout) if batched else restored[i]

        return hook

    handles = [blocks[i].register_forward_hook(replace_output(i)) for i in restored]
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
