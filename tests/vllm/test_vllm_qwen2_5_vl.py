"""IPCV in vLLM's own Qwen2.5-VL (windows in the ``window_index`` order, fused residual RMSNorm,
per-head ``qkv`` layout): the plugin patches it when built, ratio 0 equals unpatched vLLM, and its
vision embeddings equal transformers' ``apply_ipcv`` on the same saved weights."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.testing import assert_close, assert_close_to_reference
from ipcv_kernels.testing.models import sample_pixels
from ipcv_kernels.vllm.testing import ENGINE

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2]],
    "video": [[2, 8, 8]],
}
_fresh = itertools.count(1000)


@pytest.fixture(scope="module")
def llm(qwen2_5_vl_path):
    from vllm import LLM

    return LLM(model=qwen2_5_vl_path, hf_overrides={"ipcv": SETTINGS}, **ENGINE)


@pytest.fixture(scope="module")
def hf_model(qwen2_5_vl_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_path, dtype=torch.float32).eval()


def encode(llm, hf_model, grid, config):
    """``(vLLM's embeddings, the pixels vLLM's blocks saw, grid)`` with ``config`` (``None``:
    unpatched) on the running engine's model."""
    pixels, grid_thw = sample_pixels(hf_model.config.vision_config, grid, seed=next(_fresh))
    video = grid[0][0] > 1
    key = "video" if video else "image"
    kwargs = {"pixel_values_videos" if video else "pixel_values": pixels, f"{key}_grid_thw": grid_thw}

    def run(model):
        ikv.remove_ipcv(model) if config is None else ikv.apply_ipcv(model, config)
        normalised = model.visual.input_norm(pixels.clone(), model.visual.dtype)
        return torch.cat(model.embed_multimodal(**kwargs)).clone(), normalised

    with torch.no_grad():
        ((embeddings, normalised),) = llm.apply_model(run)
    return embeddings, normalised, grid_thw, kwargs


def test_plugin_patches_the_model_when_built(llm):
    assert llm.apply_model(lambda m: ik.get_ipcv_patch(m).config) == [ik.IPCVConfig(**SETTINGS)]
    assert llm.apply_model(lambda m: ikv.find_vllm_family(m)[0].name) == ["Qwen2.5-VL"]


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_ratio_zero_equals_unpatched(llm, hf_model, grid):
    expected, _, _, kwargs = encode(llm, hf_model, grid, None)
    zero = ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=3)
    with torch.no_grad():
        (got,) = llm.apply_model(lambda m: (ikv.apply_ipcv(m, zero), torch.cat(m.embed_multimodal(**kwargs)))[1])
    assert_close(got, expected)


@pytest.fixture(scope="module")
def hf_model64(hf_model):
    return copy.deepcopy(hf_model).to(torch.float64)


@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_vision_embeddings_equal_transformers(llm, hf_model, hf_model64, grid, as_layers):
    """vLLM's attention and fused residual RMSNorm round differently from transformers', and
    pruned blocks run vLLM's own (windowed) attention, whose round-off grows over the pruned
    blocks. So the bound is derived as for every fast path (``assert_close_to_reference``): vLLM's
    error against the float64 transformers tower is at most ``TOLERANCE_FACTOR`` times
    transformers' own fp32 error, plus the fp32 floor."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    got, normalised, grid_thw, _ = encode(llm, hf_model, grid, config)
    with torch.no_grad():
        with ik.ipcv_applied(hf_model, config):
            expected32 = hf_model.model.visual(normalised, grid_thw=grid_thw).pooler_output
        with ik.ipcv_applied(hf_model64, config):
            expected64 = hf_model64.model.visual(normalised.double(), grid_thw=grid_thw).pooler_output
    assert got.shape == expected64.shape
    assert_close_to_reference(got, expected64, expected32)
