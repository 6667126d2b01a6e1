"""Tensor parallelism: SGLang shards the ViT's heads (``qkv_proj`` / ``proj``) and MLP across
ranks, the hidden states between blocks stay replicated, so every rank must plan the same tokens.

``tensor_parallel_size=2`` runs here: two spawned processes, one gloo rank each, each loading the
plugin through its entry point and building the model through SGLang's loader
(``ipcv_kernels.sglang.testing.encode_on_ranks``). Against the in-process ``tensor_parallel_size=1``
model of the same checkpoint, for every family with an SGLang entry (InternVL: 4 vision heads, 2
per rank, its QK norm gathering every head; Gemma 3: one crop, SigLIP's 4 heads, 2 per rank; Gemma 4:
4 heads, 2 per rank, padded images; Llama 4: 4 heads, 2 per rank, tiles of three images; MiniCPM-V: 4
heads, 2 per rank, slices 2 x 2 merged inside the tower; Kimi-K2.5: MoonViT's 4 heads, 2 per rank):

- both ranks' plans (``keep``, ``drop``, neighbours, kept segments) are bit-identical, as are
  their token counts per block and their outputs, and each rank holds half the heads;
- the plan agrees with the TP=1 model's up to near-ties (the row-parallel all-reduce changes the
  summation order, ~1e-7);
- the TP=1 model run on the TP=2 plan gives the TP=2 output within the fp32 tolerance.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip(
    "sglang.srt.models.qwen2_vl", reason="SGLang is not installed (tests/sglang run in their own environment)"
)

import ipcv_kernels as ik
import ipcv_kernels.sglang as iks
from ipcv_kernels.reference import IPCVPlan
from ipcv_kernels.sglang.testing import FAMILIES, encode_images, encode_on_ranks
from ipcv_kernels.testing import assert_close, assert_plans_agree
from ipcv_kernels.vllm.testing import internvl_tiles, qwen_encoder_inputs

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
GRID = [[1, 8, 12], [1, 6, 4], [1, 8, 8]]
TILES = [3, 1, 5]  # InternVL, Llama 4: tiles per image
PLAN_FIELDS = IPCVPlan._fields
_ports = itertools.count(29641, 7)


PIXTRAL_SIZES = [(16, 24), (24, 16), (32, 32)]  # Mistral 3: images at their own size
MINICPMV_SLICES = [(8, 12), (8, 8), (4, 8)]  # MiniCPM-V: slices in patches, multiples of 4


def images(model, family_id):
    """``(pixels, layout)`` of three images of different sizes (``encode_images``' arguments)."""
    if family_id == "internvl_chat":
        return internvl_tiles(sum(TILES), seed=7), TILES
    if family_id == "llama4":  # tiles of 16 pixels, an image's tiles (its global tile included) one item
        return torch.randn(sum(TILES), 3, 16, 16, generator=torch.Generator().manual_seed(7)), TILES
    if family_id == "gemma3":  # one crop: SGLang's Gemma 3 runs its tower once per crop
        return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7)), [1]
    if family_id == "gemma4":  # patches padded to 64 rows and their positions (-1 on padding)
        from ipcv_kernels.testing.models import gemma4_patches

        return gemma4_patches([(6, 8), (10, 6), (8, 8)], 64, seed=7)
    if family_id == "minicpmv":  # slices of different sizes packed into one sequence, their target sizes
        from ipcv_kernels.testing.models import minicpmv_pixels

        return minicpmv_pixels(model.config.vision_config, MINICPMV_SLICES, seed=7)
    if family_id == "mistral3":  # zero-padded to one batch, with their sizes
        generator = torch.Generator().manual_seed(7)
        pixels = torch.zeros(len(PIXTRAL_SIZES), 3, 32, 32)
        for image, (height, width) in zip(pixels, PIXTRAL_SIZES, strict=True):
            image[:, :height, :width] = torch.randn(3, height, width, generator=generator)
        return pixels, torch.tensor(PIXTRAL_SIZES)
    if family_id == "kimi_k25":  # patches [n, 3, p, p], row-major, and their grid rows
        from ipcv_kernels.testing.models import kimi_k25_pixels

        return kimi_k25_pixels(model.config.vision_config, GRID, seed=7)
    # SGLang's Qwen3.5 model keeps its text config as ``config``: its tower's patch sizes instead.
    sizes = getattr(model.config, "vision_config", None) or model.visual.patch_embed
    kwargs, pixels = qwen_encoder_inputs(sizes, GRID, seed=7)
    return pixels, kwargs["image_grid_thw"]


@pytest.mark.parametrize("family_id", FAMILIES)
def test_two_ranks_plan_alike_and_equal_one_rank(family_id, sglang_process, checkpoint):
    model = sglang_process(family_id, {"ipcv": SETTINGS})
    pixels, layout = images(model, family_id)
    ranks = encode_on_ranks(checkpoint(family_id), SETTINGS, pixels, layout, tp_size=2, port=next(_ports))

    first, second = ranks
    for name in (*PLAN_FIELDS, "output"):
        assert torch.equal(first[name], second[name]), name
    assert first["tokens"] == second["tokens"]
    patch = ik.get_ipcv_patch(model)
    block = patch.blocks[0]
    # Qwen / InternViT: ``attn``; Pixtral: ``attention``; SigLIP, Gemma 4: ``self_attn``.
    attention = next(getattr(block, name) for name in ("attn", "attention", "self_attn") if hasattr(block, name))
    attention = getattr(attention, "attn", attention)
    total_heads = getattr(attention, "num_attention_heads_per_partition", None) or attention.num_heads_per_partition
    assert first["heads"] == second["heads"] == total_heads // 2

    recorded = []
    plan_of = patch.adapter.plan

    def plan(x_before, x_after, *args, **kwargs):
        recorded.append((x_before, x_after, plan_of(x_before, x_after, *args, **kwargs)))
        return recorded[-1][2]

    patch.adapter.plan = plan
    with torch.no_grad():
        encode_images(model, pixels, layout)
    x_before, x_after, plan_tp1 = recorded[-1]
    plan_tp2 = IPCVPlan(**{name: first[name] for name in PLAN_FIELDS})
    assert_plans_agree(plan_tp2, plan_tp1, x_before, x_after)

    pinned = iks.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))
    pinned.adapter.plan = lambda *args, **kwargs: plan_tp2
    try:
        with torch.no_grad():
            on_tp2_plan = encode_images(model, pixels, layout)
    finally:
        iks.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))
    assert_close(first["output"], on_tp2_plan)
    assert first["tokens"] == pinned.last_tokens_per_block
