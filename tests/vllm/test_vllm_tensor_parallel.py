"""IPCV in vLLM with a tensor-parallel vision tower: ``tensor_parallel_size=2`` (two CPU worker
processes, ``distributed_executor_backend="mp"``) against the same checkpoint at
``tensor_parallel_size=1``, for Qwen2-VL and Qwen2.5-VL (fp32, eager).

vLLM shards the tower's heads across the ranks; the hidden states between blocks are replicated.
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

import numpy as np
import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from PIL import Image

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.reference import IPCVPlan
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import sample_pixels
from ipcv_kernels.vllm.testing import ENGINE

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2]],
    "video": [[2, 8, 8]],
}
PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8"
_fresh = itertools.count(2000)  # every check gets new pixels / images (vLLM caches encodings)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def engines(request):
    """``(TP=1 engine, TP=2 engine)`` on one tiny checkpoint, both with ``SETTINGS``."""
    from vllm import LLM

    path = request.getfixturevalue(f"{request.param}_path")
    single = LLM(model=path, hf_overrides={"ipcv": SETTINGS}, **ENGINE)
    with pytest.MonkeyPatch.context() as env:  # what the spawned workers inherit
        # One thread each: the two workers and this process share the cores (their threads are
        # not bound, see conftest.py). No torch.compile: at tensor_parallel_size > 1 vLLM's vocab
        # embedding compiles its masking function (an inductor C++ build at the first request,
        # half a minute on the CPU); the engine runs eager anyway (enforce_eager).
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("TORCHDYNAMO_DISABLE", "1")
        parallel = LLM(
            model=path,
            hf_overrides={"ipcv": SETTINGS},
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            **ENGINE,
        )
    yield single, parallel
    parallel.llm_engine.engine_core.shutdown()  # its worker processes


# -- run in the workers (through apply_model) ---------------------------------------------------
def _heads(model: torch.nn.Module) -> int:
    """Attention heads of the tower's first block on this rank."""
    return model.visual.blocks[0].attn.num_attention_heads_per_partition


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
        return torch.cat(model.embed_multimodal(**kwargs)).clone()


def _diagnostics(model: torch.nn.Module) -> tuple[list[int], IPCVPlan | None]:
    """The patch's tokens per block and recorded plan of its latest forward."""
    patch = ik.get_ipcv_patch(model)
    return patch.last_tokens_per_block, getattr(patch.adapter, "recorded_plan", None)


# -- tests ----------------------------------------------------------------------------------------
def test_the_tower_is_sharded_across_two_ranks(engines):
    single, parallel = engines
    (heads,) = single.apply_model(_heads)
    assert parallel.apply_model(_heads) == [heads // 2] * 2
    assert parallel.apply_model(_config) == [ik.IPCVConfig(**SETTINGS)] * 2  # the plugin ran on every rank


def _request_kwargs(engine, grid):
    pixels, grid_thw = sample_pixels(engine.llm_engine.model_config.hf_config.vision_config, grid, seed=next(_fresh))
    key = "video" if grid[0][0] > 1 else "image"
    return {"pixel_values_videos" if key == "video" else "pixel_values": pixels, f"{key}_grid_thw": grid_thw}


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_every_rank_plans_the_same_and_equals_tensor_parallel_size_1(engines, grid):
    single, parallel = engines
    kwargs = _request_kwargs(single, grid)
    try:
        parallel.apply_model(_record_plans)
        ranks = parallel.apply_model(functools.partial(_encode, kwargs=kwargs))
        (tokens0, plan0), (tokens1, plan1) = parallel.apply_model(_diagnostics)
        # Replicated hidden states: the same plan, bit for bit, and the same embeddings.
        assert tokens0 == tokens1
        assert all(torch.equal(a, b) for a, b in zip(plan0, plan1, strict=True))
        assert torch.equal(ranks[0], ranks[1])
        total = sum(t * h * w for t, h, w in grid)
        assert tokens0[: SETTINGS["prune_layer"]] == [total] * SETTINGS["prune_layer"]
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


def test_generate_equals_tensor_parallel_size_1(engines):
    from vllm import SamplingParams

    single, parallel = engines
    params = SamplingParams(max_tokens=6, temperature=0.0)
    images = [_random_image(*size) for size in [(16, 24), (24, 16), (12, 12)]]
    outputs = {}
    for name, engine in {"tp1": single, "tp2": parallel}.items():
        # A new uuid per engine run: vLLM keys its encoder cache by it.
        requests = [
            {
                "prompt": PROMPT,
                "multi_modal_data": {"image": image},
                "multi_modal_uuids": {"image": [f"{name}{next(_fresh)}"]},
            }
            for image in images
        ]
        outputs[name] = [out.outputs[0].token_ids for out in engine.generate(requests, params, use_tqdm=False)]
    assert outputs["tp2"] == outputs["tp1"]
    (tokens0, _), (tokens1, _) = parallel.apply_model(_diagnostics)
    assert tokens0 == tokens1
    assert tokens0[-1] < tokens0[0]
