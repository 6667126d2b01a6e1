"""Every family of the table with an SGLang entry on the same checks (CPU, fp32, eager), on tiny
checkpoints saved with seeded random weights that SGLang and transformers both load, SGLang's
model built by its own loader with the plugin's hook (``--json-model-override-args``' ``ipcv``):

- the plugin patches the model when SGLang builds it, with the family's recommended setting for
  missing keys;
- ratio 0 equals the unpatched SGLang tower;
- with pruning, SGLang's tower output equals transformers' ``apply_ipcv`` on the same weights (one
  image, several of different sizes in one call, a video; ``scope="image"`` and ``"authors"``;
  with and without stabilisation blocks), and the tower's token counts show the pruning;
- images of different sizes in one call equal each image alone, and differ from planning them as
  one item;
- every attention call of SGLang's blocks gets metadata (``VisionAttentionMetadata``) that agrees
  with its ``cu_seqlens`` and its rows, pruned blocks included.

Gemma 3 (SigLIP) is checked alike in its own tests below (``test_gemma3_*``): SGLang's
``get_image_feature`` encodes each crop in a tower call of its own, so plans and tokens are compared
per tower call, and transformers runs each crop as its own call too.

Plans are compared up to near-ties (``assert_plans_agree``), outputs on SGLang's plan, bounded as
every fast path is (``assert_close_to_reference``: SGLang's error against the float64 transformers
model at most ``TOLERANCE_FACTOR`` times transformers' own fp32 error, plus the fp32 floor).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

# A submodule: without SGLang, ``import sglang`` alone would find tests/sglang (a namespace package).
pytest.importorskip(
    "sglang.srt.models.qwen2_vl", reason="SGLang is not installed (tests/sglang run in their own environment)"
)

import ipcv_kernels as ik
import ipcv_kernels.sglang as iks
from ipcv_kernels.families import FAMILIES as TABLE
from ipcv_kernels.families import find_sglang_family
from ipcv_kernels.families.table import INTERNVL_RECOMMENDED, MINICPMV_RECOMMENDED
from ipcv_kernels.sglang.testing import encode_images
from ipcv_kernels.testing import (
    TOLERANCE_FACTOR,
    assert_close,
    assert_close_to_reference,
    assert_plans_agree,
    tolerance,
)
from ipcv_kernels.vllm.testing import INTERNVL_TILE, build_checkpoint, internvl_tiles, qwen_encoder_inputs

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
CONFIG = ik.IPCVConfig(**SETTINGS)
CALLS = ("one_image", "images_of_different_sizes", "video")
GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2], [1, 8, 8]],
    "video": [[2, 8, 8]],
}
INTERNVL_TILES = {"one_image": [3], "images_of_different_sizes": [3, 1, 5], "video": [4]}  # per item
TILE_ROWS = 1 + (INTERNVL_TILE // 4) ** 2  # CLS + 4 x 4 patches
_fresh = itertools.count(100)


@dataclass(frozen=True)
class Call:
    """One encoder call: the pixels (Qwen: patches ``[n, C * T * p * p]``; InternVL: tiles ``[tiles,
    3, H, W]``), the layout SGLang's call takes (``grid_thw`` rows, or tiles per image / frames per
    video), the items transformers gets, whether it is a video, and its token count."""

    pixels: torch.Tensor
    layout: Any
    items: Any
    video: bool
    tokens: int


@dataclass(frozen=True)
class Family:
    """One SGLang family under test: its row's name and recommended setting, transformers' class
    and checkpoint (the same weights), how to make a call and split it into its items, what of
    transformers equals SGLang's output (``reference(hf_model, call)``), and which blocks attend
    through SGLang's ``VisionAttention`` (``own_attention(depth, config)``)."""

    name: str
    hf_class: str
    reference_checkpoint: str
    make_call: Callable[[Any, str, int], Call]
    split: Callable[[Call], list[Call]]
    reference: Callable[[Any, Call], torch.Tensor]
    own_attention: Callable[[int, ik.IPCVConfig], list[int]]
    attention_path: str = "attn"
    recommended: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The calls whose unpatched SGLang output equals transformers' (see TRANSFORMERS_CASES).
    transformers_calls: tuple[str, ...] = CALLS
    # The calls the family's tower takes (Mistral 3: images only).
    calls: tuple[str, ...] = CALLS
    # Whether SGLang's blocks attend with ``cu_seqlens`` and ``VisionAttentionMetadata`` (else
    # with a mask: Gemma 4's dense padding mask, Mistral 3's block-diagonal one).
    metadata: bool = True
    # The blocks before a merge inside the tower (MiniCPM-V: block 0), whose rows the call's
    # ``tokens`` (the rows from the merge on) does not count.
    unmerged_blocks: int = 0


# -- Qwen ----------------------------------------------------------------------------------------
def qwen_call(model, name, seed):
    # SGLang's Qwen3.5 model keeps its text config as ``config`` (as its Qwen3-VL MoE does): the
    # patch sizes are its tower's patch embedding's.
    sizes = getattr(model.config, "vision_config", None) or model.visual.patch_embed
    kwargs, pixels = qwen_encoder_inputs(sizes, GRIDS[name], seed=seed)
    grid_thw = kwargs[f"{'video' if name == 'video' else 'image'}_grid_thw"]
    return Call(pixels, grid_thw, grid_thw, name == "video", int(grid_thw.prod(-1).sum()))


def qwen_split(call):
    lengths = call.layout.prod(-1).tolist()
    return [
        Call(pixels, grid, grid, call.video, int(grid.prod(-1).sum()))
        for pixels, grid in zip(call.pixels.split(lengths), call.layout.split(1), strict=True)
    ]


def qwen_merger(hf_model, call):
    return hf_model.model.visual(call.pixels.to(hf_model.dtype), grid_thw=call.layout).pooler_output


def qwen3_merger_and_taps(hf_model, call):
    """SGLang's Qwen3-VL tower output: the merger's and every DeepStack tap's, ``[n / 4, 4 * D]``."""
    output = hf_model.model.visual(call.pixels.to(hf_model.dtype), grid_thw=call.layout)
    return torch.cat([output.pooler_output, *output.deepstack_features], dim=1)


def glm4v_call(model, name, seed):
    """Qwen's calls, a video given as one grid row per frame: SGLang's GLM model calls its tower so
    (``get_video_feature``), as transformers' does (its tower takes no ``t > 1`` row)."""
    call = qwen_call(model, name, seed)
    frames = torch.tensor([[1, h, w] for t, h, w in call.layout.tolist() for _ in range(t)])
    return Call(call.pixels, frames, frames, call.video, call.tokens)


def glm4v_merger(hf_model, call):
    """transformers' GLM-4.1V features, a video's frames given to the tower as rows of their own
    (as ``get_video_features`` does; the bare tower takes no ``t > 1``)."""
    frames = torch.tensor([[1, h, w] for t, h, w in call.layout.tolist() for _ in range(t)])
    return hf_model.model.visual(call.pixels.to(hf_model.dtype), grid_thw=frames).pooler_output


def qwen_attention(depth, config):
    """SGLang's blocks run outside the stabilisation stretch (which runs ``ngr_attention``)."""
    return [i for i in range(depth) if not config.prune_layer <= i < config.stabilisation_end(depth)]


# -- InternVL ------------------------------------------------------------------------------------
def internvl_call(model, name, seed):
    counts = INTERNVL_TILES[name]
    tiles = internvl_tiles(sum(counts), seed=seed)
    # transformers: every video frame is its own run of image tokens, hence its own item.
    items = [1] * sum(counts) if name == "video" else counts
    return Call(tiles, counts, items, name == "video", sum(counts) * TILE_ROWS)


def internvl_split(call):
    return [
        Call(tiles, [count], [count], call.video, count * TILE_ROWS)
        for tiles, count in zip(call.pixels.split(call.layout), call.layout, strict=True)
    ]


def internvl_features(hf_model, call, layer=-1):
    """transformers' image features ``[tiles * 4, D]`` with ``call.items`` tiles per item, read at
    ``hidden_states[layer]``."""
    ik.set_tiles_per_image(hf_model, call.items)
    features = hf_model.model.get_image_features(
        pixel_values=call.pixels.to(hf_model.dtype),
        vision_feature_layer=layer,
        vision_feature_select_strategy="default",
    )
    return features.pooler_output.reshape(-1, features.pooler_output.shape[-1])


def internvl_attention(depth, config):
    """SGLang's layers run before ``P``; from ``P`` on the functional layer (``ngr_attention``)."""
    return list(range(config.prune_layer))


# -- Gemma 4 ----------------------------------------------------------------------------------------
# Images of (rows, cols) patches padded to 64 rows. SGLang 0.5.23's pooler averages padding rows into
# an image's first soft token (transformers zeroes them first), so calls with padding are compared
# with SGLang's own tower only; "images_of_different_sizes" (three aspect ratios of 64 patches) and
# "unpadded_image" have none and are compared with transformers too.
GEMMA4_GRIDS = {
    "one_image": [(6, 8)],
    "images_of_different_sizes": [(8, 8), (4, 16), (16, 4)],
    "video": [(6, 8), (6, 8)],  # two frames, each encoded as a row (each its own item)
    "unpadded_image": [(8, 8)],
}


def gemma4_call(model, name, seed):
    from ipcv_kernels.testing.models import gemma4_patches

    grids = GEMMA4_GRIDS[name]
    pixels, positions = gemma4_patches(grids, 64, seed=seed)
    return Call(pixels, positions, None, name == "video", len(grids) * 64)


def gemma4_split(call):
    return [
        Call(pixels[None], positions[None], None, call.video, 64)
        for pixels, positions in zip(call.pixels, call.layout, strict=True)
    ]


def gemma4_tower(hf_model, call):
    tower = hf_model.model.vision_tower
    return tower(pixel_values=call.pixels.to(hf_model.dtype), pixel_position_ids=call.layout).last_hidden_state


def gemma4_attention(depth, config):
    """SGLang's own layers run before ``P``; from ``P`` on the functional layer (``ngr_attention``)."""
    return list(range(config.prune_layer))


# -- Mistral 3 (Pixtral) -------------------------------------------------------------------------
# Images at their own size (4-pixel patches, 2 x 2 merged after the tower), zero-padded to one batch.
PIXTRAL_SIZES = {"one_image": [(16, 24)], "images_of_different_sizes": [(16, 24), (24, 16), (8, 16), (32, 32)]}


def pixtral_call(model, name, seed):
    sizes = PIXTRAL_SIZES[name]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for image, (height, width) in zip(pixels, sizes, strict=True):
        image[:, :height, :width] = torch.randn(3, height, width, generator=generator)
    layout = torch.tensor(sizes)
    return Call(pixels, layout, layout, False, sum(h * w for h, w in sizes) // 16)


def pixtral_split(call):
    return [
        Call(call.pixels[i : i + 1, :, :h, :w], call.layout[i : i + 1], call.layout[i : i + 1], False, h * w // 16)
        for i, (h, w) in enumerate(call.layout.tolist())
    ]


def pixtral_features(hf_model, call):
    """transformers' projected image features of every image, concatenated."""
    images = hf_model.model.get_image_features(pixel_values=call.pixels.to(hf_model.dtype), image_sizes=call.layout)
    return torch.cat(images.pooler_output)


# -- Llama 4 --------------------------------------------------------------------------------------
# Fixed tiles of 16 pixels (4 x 4 patches and a CLS row last), an image's tiles (its global tile
# included) one item: SGLang's get_image_feature gets one item per image.
LLAMA4_TILES = {"one_image": [3], "images_of_different_sizes": [3, 1, 5]}
LLAMA4_TILE_ROWS = 1 + 4 * 4


def llama4_call(model, name, seed):
    counts = LLAMA4_TILES[name]
    tiles = torch.randn(sum(counts), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return Call(tiles, counts, counts, False, sum(counts) * LLAMA4_TILE_ROWS)


def llama4_split(call):
    return [
        Call(tiles, [count], [count], False, count * LLAMA4_TILE_ROWS)
        for tiles, count in zip(call.pixels.split(call.layout), call.layout, strict=True)
    ]


def llama4_features(hf_model, call):
    """transformers' projected features ``[tiles * 4, D]``, ``call.items`` tiles per item (transformers
    5.19's ``get_image_features`` returns the tower's output, projected in ``forward``)."""
    patch = ik.get_ipcv_patch(hf_model)
    with patch.hinted(tiles_per_image=call.items) if patch is not None else contextlib.nullcontext():
        features = hf_model.get_image_features(pixel_values=call.pixels.to(hf_model.dtype)).last_hidden_state
    return hf_model.multi_modal_projector(features.reshape(-1, features.shape[-1]))


# -- MiniCPM-V 4.6 ----------------------------------------------------------------------------------
# Slices (rows, columns) of 2-pixel patches, multiples of 4 (two 2 x 2 merges), packed into one
# sequence as transformers and SGLang take them; the tower merges 2 x 2 after block 0, so the
# call's tokens are the merged rows of blocks 1 on.
MINICPMV_SLICES = {
    "one_image": [(8, 12), (8, 8), (8, 8)],
    "images_of_different_sizes": [(8, 12), (8, 8), (4, 8), (12, 8), (4, 4)],
}


def minicpmv_call(model, name, seed):
    from ipcv_kernels.testing.models import minicpmv_pixels

    sizes = MINICPMV_SLICES[name]
    pixels, target_sizes = minicpmv_pixels(model.config.vision_config, sizes, seed=seed)
    return Call(pixels, target_sizes, target_sizes, False, sum((h // 2) * (w // 2) for h, w in sizes))


def minicpmv_split(call):
    p = call.pixels.shape[2]
    widths = (call.layout.prod(-1) * p).tolist()
    return [
        Call(pixels, size[None], size[None], False, int(size[0] // 2) * int(size[1] // 2))
        for pixels, size in zip(call.pixels.split(widths, dim=-1), call.layout, strict=True)
    ]


def minicpmv_features(hf_model, call):
    """transformers' projected features of every slice, concatenated."""
    return torch.cat(hf_model.model.get_image_features(call.pixels.to(hf_model.dtype), call.layout).pooler_output)


# -- Kimi-K2.5 ------------------------------------------------------------------------------------
def kimi_k25_call(model, name, seed):
    """Patches ``[n, 3, p, p]`` of the ``GRIDS`` rows, row-major (a video: one clip of ``t``
    frames, one grid row, one item)."""
    from ipcv_kernels.testing.models import kimi_k25_pixels

    pixels, grid_thws = kimi_k25_pixels(model.config.vision_config, GRIDS[name], seed=seed)
    return Call(pixels, grid_thws, grid_thws, name == "video", int(grid_thws.prod(-1).sum()))


def kimi_k25_features(hf_model, call):
    """transformers' tower (temporal pooling included) and projector, ``[tokens, D]`` (its
    ``get_image_features`` splits a clip's rows by ``t * h * w / 4``: spec §5.10)."""
    model = hf_model.model
    pooled = model.vision_tower(call.pixels.to(hf_model.dtype), grid_thw=call.layout).pooler_output
    features = model.mm_projector(pooled)
    return features.reshape(-1, features.shape[-1])


def qwen(name, prefix, reference=qwen_merger, **extra):
    return Family(
        name, f"{prefix}ForConditionalGeneration", None, qwen_call, qwen_split, reference, qwen_attention, **extra
    )


FAMILIES = {
    "qwen2_vl": qwen("Qwen2-VL", "Qwen2VL"),
    "qwen2_5_vl": qwen("Qwen2.5-VL", "Qwen2_5_VL", transformers_calls=("one_image", "images_of_different_sizes")),
    "qwen3_vl": qwen("Qwen3-VL", "Qwen3VL", qwen3_merger_and_taps),
    # Qwen3-VL's tower without DeepStack (SGLang builds its Qwen3-VL tower class).
    "qwen3_5": qwen("Qwen3.5", "Qwen3_5"),
    # A video's frames are items of their own, as transformers' GLM model calls its tower.
    "glm4v": dataclasses.replace(qwen("GLM-4.1V / 4.5V / 4.6V", "Glm4v", glm4v_merger), make_call=glm4v_call),
    # InternVL's own format; transformers runs the native checkpoint of the same weights.
    "internvl_chat": Family(
        "InternVL-Chat",
        "InternVLForConditionalGeneration",
        "internvl",
        internvl_call,
        internvl_split,
        internvl_features,
        internvl_attention,
        attention_path="attn.attn",
        recommended=INTERNVL_RECOMMENDED,
    ),
    "gemma4": Family(
        "Gemma 4",
        "Gemma4ForConditionalGeneration",
        None,
        gemma4_call,
        gemma4_split,
        gemma4_tower,
        gemma4_attention,
        attention_path="self_attn",
        transformers_calls=("images_of_different_sizes", "unpadded_image"),
        metadata=False,
    ),
    # MoonViT: packed rows, interleaved complex rotary, a clip's frames one segment; SGLang's
    # VisionAttention with metadata, as the Qwen towers'.
    "kimi_k25": Family(
        "Kimi-K2.5",
        "Kimi_K25ForConditionalGeneration",
        None,
        kimi_k25_call,
        qwen_split,
        kimi_k25_features,
        qwen_attention,
    ),
    # Pixtral: images packed into one sequence, SGLang's attention with a block-diagonal mask.
    "mistral3": Family(
        "Mistral 3",
        "Mistral3ForConditionalGeneration",
        None,
        pixtral_call,
        pixtral_split,
        pixtral_features,
        qwen_attention,
        attention_path="attention",
        transformers_calls=tuple(PIXTRAL_SIZES),
        calls=tuple(PIXTRAL_SIZES),
        metadata=False,
    ),
    # Batched tiles, CLS last; SGLang's attention (flatten_batch=False) takes no segments or metadata.
    "llama4": Family(
        "Llama 4",
        "Llama4ForConditionalGeneration",
        None,
        llama4_call,
        llama4_split,
        llama4_features,
        internvl_attention,
        attention_path="self_attn",
        transformers_calls=tuple(LLAMA4_TILES),
        calls=tuple(LLAMA4_TILES),
        metadata=False,
    ),
    # Slices packed with cu_seqlens (transformers' call), 2 x 2 merged inside the tower after block 0.
    "minicpmv": Family(
        "MiniCPM-V 4.6 / 4.7",
        "MiniCPMV4_6ForConditionalGeneration",
        None,
        minicpmv_call,
        minicpmv_split,
        minicpmv_features,
        qwen_attention,
        attention_path="self_attn",
        recommended=MINICPMV_RECOMMENDED,
        transformers_calls=tuple(MINICPMV_SLICES),
        calls=tuple(MINICPMV_SLICES),
        unmerged_blocks=1,
    ),
}


# SGLang 0.5.23's Qwen2.5-VL full-attention blocks attend over a whole video (one segment of
# ``t * h * w`` rows per ``grid_thw`` row), transformers' over each frame: unpatched, the two differ
# for videos (``test_qwen2_5_vl_videos_differ_from_transformers_unpatched``), so a Qwen2.5-VL video
# is compared with SGLang's own tower only (ratio 0, batching, metadata), never with transformers.
TRANSFORMERS_CASES = [(family_id, name) for family_id, family in FAMILIES.items() for name in family.transformers_calls]
# Every call each family's tower takes.
CASES = [(family_id, name) for family_id, family in FAMILIES.items() for name in family.calls]


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family_id(request):
    return request.param


@pytest.fixture(scope="module")
def model(family_id, sglang_process):
    """SGLang's model of the family, built by SGLang's loader with ``{"ipcv": SETTINGS}``."""
    return sglang_process(family_id, {"ipcv": SETTINGS})


@pytest.fixture(scope="module")
def hf_models(family_id, checkpoint, tmp_path_factory):
    """transformers' model of the same weights, fp32 and fp64 (complex buffers left complex: Llama 4's
    rotary table)."""
    import transformers

    from ipcv_kernels.testing.models import to_real_dtype

    family = FAMILIES[family_id]
    if family.reference_checkpoint is None:
        path = checkpoint(family_id)
    else:
        path = build_checkpoint(tmp_path_factory.mktemp(family.reference_checkpoint), family.reference_checkpoint)
    model = getattr(transformers, family.hf_class).from_pretrained(path, dtype=torch.float32).eval()
    return model, to_real_dtype(copy.deepcopy(model), torch.float64)


def blocks_of(model):
    patch = ik.get_ipcv_patch(model)
    return patch.blocks


def record_plans(patch, pinned=None):
    """From now on ``patch``'s adapter keeps ``(x_before, x_after, plan)`` of its latest forward as
    ``recorded``; with ``pinned`` it returns that plan instead of planning."""
    adapter, plan_of = patch.adapter, patch.adapter.plan

    def plan(x_before, x_after, *args, **kwargs):
        result = plan_of(x_before, x_after, *args, **kwargs) if pinned is None else pinned
        adapter.recorded = (x_before, x_after, result)
        return result

    adapter.plan = plan


def encode(model, call, config, pinned=None):
    """``(SGLang's vision features, tokens per block, plan)`` of ``call`` under ``config``
    (``None``: unpatched); the plugin's setting is back afterwards."""
    patch = None
    if config is None:
        iks.remove_ipcv(model)
    else:
        patch = iks.apply_ipcv(model, config)
        record_plans(patch, pinned)
    try:
        with torch.no_grad():
            output = encode_images(model, call.pixels, call.layout, video=call.video)
    finally:
        iks.apply_ipcv(model, CONFIG)
    if patch is None:
        return output, None, None
    return output, patch.last_tokens_per_block, patch.adapter.recorded[2]


def without_empty_segments(plan):
    """``plan`` with its kept segment offsets free of empty segments: SGLang's Qwen2.5-VL tower
    starts its full-attention offsets with one (``[0, 0, n_1, ...]``), transformers' does not (the
    tests plan at a full-attention block, where transformers' offsets have no empty segment)."""
    return plan._replace(cu_seqlens_kept=torch.unique_consecutive(plan.cu_seqlens_kept))


def transformers_run(family, hf_model, config, call, pinned=None):
    """``(family.reference output, (x_before, x_after, plan))`` of transformers under ``config``."""
    with torch.no_grad(), ik.ipcv_applied(hf_model, config):
        patch = ik.get_ipcv_patch(hf_model)
        record_plans(patch, pinned)
        output = family.reference(hf_model, call)
        return output, patch.adapter.recorded


def test_every_sglang_row_of_the_family_table_is_tested_here():
    rows = {row.id: row for row in TABLE if row.sglang is not None}
    assert set(FAMILIES) | set(PER_CROP_FAMILIES) == set(rows)
    assert {family_id: rows[family_id].name for family_id in PER_CROP_FAMILIES} == PER_CROP_FAMILIES
    for family_id, family in FAMILIES.items():
        assert (family.name, family.recommended) == (rows[family_id].name, rows[family_id].recommended)
        assert rows[family_id].sglang.adapter_class().__name__ == rows[family_id].sglang.adapter.rpartition(":")[2]


def test_plugin_patches_the_model_when_built(model, family_id):
    assert ik.get_ipcv_patch(model).config == CONFIG
    assert find_sglang_family(model)[0].name == FAMILIES[family_id].name
    assert type(model).__module__.startswith("sglang.srt.models.")


def test_missing_keys_take_the_recommended_setting(family_id, sglang_process):
    given = {"prune_layer": 2, "as_layers": 1}  # the tiny towers are shallower than InternVL's P = 7
    model = sglang_process(family_id, {"ipcv": given})
    expected = ik.IPCVConfig(**{**FAMILIES[family_id].recommended, **given})
    assert ik.get_ipcv_patch(model).config == expected == ik.recommended_config(model, **given)


@pytest.mark.parametrize(("family_id", "name"), CASES, indirect=["family_id"])
def test_ratio_zero_equals_unpatched(model, family_id, name):
    call = FAMILIES[family_id].make_call(model, name, next(_fresh))
    expected, _, _ = encode(model, call, None)
    got, tokens, _ = encode(model, call, ik.IPCVConfig(**{**SETTINGS, "ratio": 0.0}))
    assert_close(got, expected)
    assert set(tokens[FAMILIES[family_id].unmerged_blocks :]) == {call.tokens}


@pytest.mark.parametrize("scope", ["image", "authors"])
@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize(("family_id", "name"), TRANSFORMERS_CASES, indirect=["family_id"])
def test_tower_equals_transformers(model, family_id, hf_models, name, as_layers, scope):
    """SGLang's plan equals the float64 transformers model's up to near-ties, and on that plan
    SGLang's vision features equal transformers'."""
    family = FAMILIES[family_id]
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers, "scope": scope})
    call = family.make_call(model, name, next(_fresh))
    got, tokens, plan = encode(model, call, config)
    hf32, hf64 = hf_models
    _, (x_before64, x_after64, plan64) = transformers_run(family, hf64, config, call)
    plan = without_empty_segments(plan)
    assert_plans_agree(plan, without_empty_segments(plan64), x_before64, x_after64)
    expected32, _ = transformers_run(family, hf32, config, call, pinned=plan)
    expected64, _ = transformers_run(family, hf64, config, call, pinned=plan)
    assert got.shape == expected64.shape
    assert_close_to_reference(got, expected64, expected32)
    unmerged = family.unmerged_blocks
    assert tokens[unmerged : config.prune_layer] == [call.tokens] * (config.prune_layer - unmerged)
    assert all(count < call.tokens for count in tokens[config.prune_layer :])


@pytest.mark.parametrize("family_id", ["qwen2_5_vl"], indirect=True)
def test_qwen2_5_vl_videos_differ_from_transformers_unpatched(model, family_id, hf_models):
    """Why Qwen2.5-VL videos are not compared with transformers (``TRANSFORMERS_CASES``): SGLang's
    tower differs from transformers' there before any patch (its full-attention segments span the
    frames). Should a later SGLang agree, this fails and the case joins ``TRANSFORMERS_CASES``."""
    family = FAMILIES[family_id]
    video = family.make_call(model, "video", next(_fresh))
    sglang_output, _, _ = encode(model, video, None)
    expected = family.reference(hf_models[0], video)
    assert (sglang_output - expected).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol
    image = family.make_call(model, "one_image", next(_fresh))
    assert_close(encode(model, image, None)[0], family.reference(hf_models[0], image))


def test_images_of_different_sizes_equal_each_alone(model, family_id):
    family = FAMILIES[family_id]
    call = family.make_call(model, "images_of_different_sizes", next(_fresh))
    together, _, plan = encode(model, call, CONFIG)
    alone, kept_alone, offsets = [], [], [0]
    for one in family.split(call):
        output, _, plan_one = encode(model, one, CONFIG)
        alone.append(output)
        kept_alone.append(plan_one.keep + offsets[-1])
        offsets.append(offsets[-1] + one.tokens)
    # The same tokens are kept per image (offsets shifted), and the outputs agree.
    assert torch.equal(plan.keep, torch.cat(kept_alone))
    assert_close(together, torch.cat(alone))


def test_each_image_is_its_own_item(model, family_id, hf_models):
    """The images of one call planned as one item (``scope="global"``) give other outputs than
    SGLang's, which equal transformers' per image (above): SGLang's call carries the images."""
    family = FAMILIES[family_id]
    call = family.make_call(model, "images_of_different_sizes", next(_fresh))
    got, _, _ = encode(model, call, CONFIG)
    as_one_item, _ = transformers_run(family, hf_models[0], dataclasses.replace(CONFIG, scope="global"), call)
    assert (got - as_one_item).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol


@pytest.mark.parametrize("family_id", ["internvl_chat"], indirect=True)
def test_internvl_reads_its_select_layer(model, family_id, hf_models):
    """``select_layer=-2``: SGLang's ``extract_feature`` reads ``hidden_states[-2]``, which the
    patch restores at the block before the last (the last one runs for nothing, and is skipped)."""
    family = dataclasses.replace(FAMILIES[family_id], reference=functools.partial(internvl_features, layer=-2))
    call = family.make_call(model, "images_of_different_sizes", next(_fresh))
    model.select_layer = -2
    try:
        got, tokens, plan = encode(model, call, CONFIG)
    finally:
        model.select_layer = -1
    expected32, _ = transformers_run(family, hf_models[0], CONFIG, call, pinned=plan)
    expected64, _ = transformers_run(family, hf_models[1], CONFIG, call, pinned=plan)
    assert_close_to_reference(got, expected64, expected32)
    assert len(tokens) == len(blocks_of(model)) - 1
    unread, _ = transformers_run(FAMILIES[family_id], hf_models[0], CONFIG, call, pinned=plan)
    assert (got - unread).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol


def attention_of(block, path):
    for name in path.split("."):
        block = getattr(block, name)
    return block


@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize(("family_id", "name"), CASES, indirect=["family_id"])
def test_every_attention_call_gets_metadata_of_its_segments(model, family_id, name, as_layers):
    """SGLang's GPU attention backends read their segments from ``forward_metadata``, the CPU
    ``sdpa`` backend from ``cu_seqlens``: each call's metadata must describe its own segments
    (``cu_seqlens``, ``seq_lens``, ``max_seqlen``) and cover its rows, pruned blocks included.
    Mistral 3's Pixtral attends with a block-diagonal ``attention_mask`` instead (no segments, no
    metadata): each call's mask must cover its rows and be block-diagonal over the call's images."""
    family = FAMILIES[family_id]
    if not family.metadata:
        pytest.skip(f"{family.name}: SGLang's attention takes no metadata (a dense mask, or batched tiles)")
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    calls: list[tuple[int, torch.Tensor, Any]] = []
    attentions = [attention_of(block, family.attention_path) for block in blocks_of(model)]
    for attention in attentions:

        def record(x, *args, _original=attention.forward, **kwargs):
            segments = kwargs["cu_seqlens"] if family.metadata else kwargs["attention_mask"]
            calls.append((x.reshape(-1, x.shape[-1]).shape[0], segments, kwargs.get("forward_metadata")))
            return _original(x, *args, **kwargs)

        attention.forward = record
    try:
        _, tokens, _ = encode(model, family.make_call(model, name, next(_fresh)), config)
    finally:
        for attention in attentions:
            del attention.forward
    expected_blocks = family.own_attention(len(attentions), config)
    assert [rows for rows, _, _ in calls] == [tokens[i] for i in expected_blocks]
    assert any(i >= config.prune_layer for i in expected_blocks) == (family_id != "internvl_chat")
    if not family.metadata:
        for rows, mask, metadata in calls:
            assert metadata is None and mask.shape == (1, 1, rows, rows)
            allowed = mask[0, 0] == 0
            first = allowed.int().argmax(-1)  # each row's image: the first row it may attend to
            assert torch.equal(allowed, first[:, None] == first[None, :])
        return
    for rows, cu_seqlens, metadata in calls:
        cu_seqlens = torch.as_tensor(cu_seqlens).to(torch.int32)
        assert metadata is not None
        assert torch.equal(metadata.cu_seqlens.cpu(), cu_seqlens.cpu())
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        assert torch.equal(metadata.seq_lens.cpu(), lengths.cpu())
        assert metadata.max_seqlen == int(lengths.max())
        assert int(cu_seqlens[-1]) == rows


# -- Gemma 3: SGLang's get_image_feature encodes each crop in a tower call of its own --------------
# Images of several crops (Gemma 3's pan-and-scan crops, 32 x 32: 4 x 4 patches, no CLS); each crop
# is one item in transformers, vLLM and SGLang alike.
GEMMA3_CROPS = {"one_image": [1], "images_of_different_sizes": [2, 1, 3]}
CROP_ROWS = 16
PER_CROP_FAMILIES = {"gemma3": "Gemma 3"}


@pytest.fixture(scope="module")
def gemma3(sglang_process):
    return sglang_process("gemma3", {"ipcv": SETTINGS})


@pytest.fixture(scope="module")
def gemma3_hf(checkpoint):
    """transformers' Gemma 3 of the same weights, fp32 and fp64."""
    import transformers

    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(checkpoint("gemma3"), dtype=torch.float32)
    return model.eval(), copy.deepcopy(model).eval().to(torch.float64)


def gemma3_crops(name, seed):
    counts = GEMMA3_CROPS[name]
    return torch.randn(sum(counts), 3, 32, 32, generator=torch.Generator().manual_seed(seed)), counts


def recording_calls(patch, tower, pinned=None):
    """From now on every tower call appends its plan to ``patch.adapter.plans`` (``pinned``: the
    plans to use instead, in call order) and its tokens per block to ``patch.adapter.tokens``;
    returns the forward hook's handle."""
    adapter, plan_of = patch.adapter, patch.adapter.plan
    adapter.plans, adapter.tokens, adapter.inputs = [], [], []
    queue = None if pinned is None else list(pinned)

    def plan(x_before, x_after, *args, **kwargs):
        result = plan_of(x_before, x_after, *args, **kwargs) if queue is None else queue.pop(0)
        adapter.plans.append(result)
        adapter.inputs.append((x_before, x_after))
        return result

    adapter.plan = plan
    return tower.register_forward_hook(lambda *_: adapter.tokens.append(list(patch.last_tokens_per_block)))


def gemma3_encode(model, pixels, counts, config):
    """``(SGLang's image features [crops * 4, D], tokens per block of each tower call, plan of each)``
    under ``config`` (``None``: unpatched); the plugin's setting is back afterwards."""
    patch = None if config is None else iks.apply_ipcv(model, config)
    if patch is None:
        iks.remove_ipcv(model)
    hook = None if patch is None else recording_calls(patch, model.vision_tower)
    try:
        with torch.no_grad():
            output = encode_images(model, pixels, counts)
    finally:
        if hook is not None:
            hook.remove()
        iks.apply_ipcv(model, CONFIG)
    if patch is None:
        return output, None, None
    return output, patch.adapter.tokens, patch.adapter.plans


def gemma3_transformers(hf_model, pixels, config, pinned=None):
    """transformers' projected features of every crop, each crop one call as SGLang makes it
    (``pinned``: SGLang's plans, one per crop), and ``(x_before, x_after, plan)`` of each call."""
    with torch.no_grad(), ik.ipcv_applied(hf_model, config):
        patch = ik.get_ipcv_patch(hf_model)
        hook = recording_calls(patch, patch.tower, pinned)
        try:
            features = [
                hf_model.model.get_image_features(pixel_values=crop[None].to(hf_model.dtype)).pooler_output
                for crop in pixels
            ]
        finally:
            hook.remove()
        recorded = [(*inputs, plan) for inputs, plan in zip(patch.adapter.inputs, patch.adapter.plans, strict=True)]
    return torch.cat(features).reshape(-1, features[0].shape[-1]), recorded


def test_gemma3_plugin_patches_the_model_when_built(gemma3, sglang_process):
    assert ik.get_ipcv_patch(gemma3).config == CONFIG
    assert find_sglang_family(gemma3)[0].name == PER_CROP_FAMILIES["gemma3"]
    given = {"prune_layer": 2, "as_layers": 1}
    model = sglang_process("gemma3", {"ipcv": given})
    assert ik.get_ipcv_patch(model).config == ik.IPCVConfig(**given) == ik.recommended_config(model, **given)


@pytest.mark.parametrize("name", list(GEMMA3_CROPS))
def test_gemma3_ratio_zero_equals_unpatched(gemma3, name):
    pixels, counts = gemma3_crops(name, next(_fresh))
    expected, _, _ = gemma3_encode(gemma3, pixels, counts, None)
    got, tokens, _ = gemma3_encode(gemma3, pixels, counts, ik.IPCVConfig(**{**SETTINGS, "ratio": 0.0}))
    assert_close(got, expected)
    assert len(tokens) == sum(counts) and {t for call in tokens for t in call} == {CROP_ROWS}


@pytest.mark.parametrize("scope", ["image", "authors"])
@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize("name", list(GEMMA3_CROPS))
def test_gemma3_tower_equals_transformers(gemma3, gemma3_hf, name, as_layers, scope):
    """Per crop (each one tower call): SGLang's plan equals the float64 transformers model's up to
    near-ties, and on SGLang's plans its features equal transformers'."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers, "scope": scope})
    pixels, counts = gemma3_crops(name, next(_fresh))
    got, tokens, plans = gemma3_encode(gemma3, pixels, counts, config)
    hf32, hf64 = gemma3_hf
    _, recorded64 = gemma3_transformers(hf64, pixels, config)
    assert len(plans) == len(recorded64) == sum(counts)
    for plan, (x_before64, x_after64, plan64) in zip(plans, recorded64, strict=True):
        assert_plans_agree(plan, plan64, x_before64, x_after64)
    expected32, _ = gemma3_transformers(hf32, pixels, config, pinned=plans)
    expected64, _ = gemma3_transformers(hf64, pixels, config, pinned=plans)
    assert got.shape == expected64.shape
    assert_close_to_reference(got, expected64, expected32)
    for call in tokens:
        assert call[: config.prune_layer] == [CROP_ROWS] * config.prune_layer
        assert all(count < CROP_ROWS for count in call[config.prune_layer :])


def test_gemma3_images_of_different_sizes_equal_each_alone(gemma3):
    pixels, counts = gemma3_crops("images_of_different_sizes", next(_fresh))
    together, _, plans = gemma3_encode(gemma3, pixels, counts, CONFIG)
    alone, plans_alone = [], []
    for image, count in zip(pixels.split(counts), counts, strict=True):
        output, _, plan = gemma3_encode(gemma3, image, [count], CONFIG)
        alone.append(output)
        plans_alone += plan
    assert [p.keep.tolist() for p in plans] == [p.keep.tolist() for p in plans_alone]
    assert_close(together, torch.cat(alone))


def test_gemma3_each_crop_is_its_own_item(gemma3, gemma3_hf):
    """The crops of one call planned as one item (transformers, one batched call, ``scope="global"``)
    give other features than SGLang's, which equal transformers' per crop (above)."""
    pixels, counts = gemma3_crops("images_of_different_sizes", next(_fresh))
    got, _, _ = gemma3_encode(gemma3, pixels, counts, CONFIG)
    hf32 = gemma3_hf[0]
    with torch.no_grad(), ik.ipcv_applied(hf32, dataclasses.replace(CONFIG, scope="global")):
        as_one_item = hf32.model.get_image_features(pixel_values=pixels).pooler_output
    assert (got - as_one_item.reshape(got.shape)).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol


@pytest.mark.parametrize("as_layers", [2, 0])
def test_gemma3_sglang_attention_runs_before_the_prune_layer_only(gemma3, as_layers):
    """SGLang's SigLIP attention gets no segments or metadata from its tower (it derives its one
    segment from its input, one crop): it runs in the layers before ``P``, on every row of the crop;
    from ``P`` on the functional layer attends through ``ngr_attention``, so no SGLang metadata can
    go stale there."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    calls = []
    attentions = [block.self_attn for block in blocks_of(gemma3)]
    for attention in attentions:

        def record(x, *args, _original=attention.forward, **kwargs):
            calls.append((tuple(x.shape), kwargs.get("cu_seqlens"), kwargs.get("forward_metadata")))
            return _original(x, *args, **kwargs)

        attention.forward = record
    try:
        pixels, counts = gemma3_crops("images_of_different_sizes", next(_fresh))
        gemma3_encode(gemma3, pixels, counts, config)
    finally:
        for attention in attentions:
            del attention.forward
    assert len(calls) == sum(counts) * config.prune_layer
    assert all(shape[:2] == (1, CROP_ROWS) and cu is None and meta is None for shape, cu, meta in calls)


@pytest.mark.parametrize("family_id", ["gemma4", "llama4"], indirect=True)
@pytest.mark.parametrize("as_layers", [2, 0])
def test_sglang_attention_without_metadata_runs_before_the_prune_layer_only(model, family_id, as_layers):
    """SGLang's Gemma 4 attention (a dense padding mask) and Llama 4's (batched tiles, segments from
    the batch shape) take no segments or metadata: they run in the blocks before ``P`` on every row;
    from ``P`` on the functional layer runs (``ngr_attention`` per image or tile), so no SGLang
    segments can go stale there."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    calls = []
    attentions = [block.self_attn for block in blocks_of(model)]
    for attention in attentions:

        def record(x, *args, _original=attention.forward, **kwargs):
            calls.append((x.shape[0] * x.shape[1], kwargs.get("cu_seqlens"), kwargs.get("forward_metadata")))
            return _original(x, *args, **kwargs)

        attention.forward = record
    try:
        call = FAMILIES[family_id].make_call(model, "images_of_different_sizes", next(_fresh))
        _, tokens, _ = encode(model, call, config)
    finally:
        for attention in attentions:
            del attention.forward
    assert [rows for rows, _, _ in calls] == [call.tokens] * config.prune_layer == tokens[: config.prune_layer]
    assert all(cu_seqlens is None and metadata is None for _, cu_seqlens, metadata in calls)
    assert all(count < call.tokens for count in tokens[config.prune_layer :])


@pytest.mark.parametrize("family_id", ["gemma4"], indirect=True)
def test_gemma4_padding_reaches_sglangs_first_soft_token_unpatched(model, family_id, hf_models):
    """Why padded Gemma 4 images are compared with SGLang's own tower only (``transformers_calls``):
    SGLang 0.5.23's pooler averages the padding rows into the first soft token of the image
    (``mask_pad_before_pool=False``), where transformers zeroes them. Should a later SGLang agree,
    this fails and the padded calls join ``TRANSFORMERS_CASES``. Without padding the two agree."""
    family = FAMILIES[family_id]
    padded = family.make_call(model, "one_image", next(_fresh))
    got, _, _ = encode(model, padded, None)
    expected = family.reference(hf_models[0], padded)
    assert (got[0] - expected[0]).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol
    assert_close(got[1:], expected[1:])  # the other soft tokens hold no padding row
    image = family.make_call(model, "unpadded_image", next(_fresh))
    assert_close(encode(model, image, None)[0], family.reference(hf_models[0], image))
