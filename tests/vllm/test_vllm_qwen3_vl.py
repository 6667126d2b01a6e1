"""IPCV in vLLM's own Qwen3-VL (Qwen2.5-VL's per-head ``qkv`` attention in Qwen2-VL's block, and
DeepStack taps after blocks 1, 3 and 4, i.e. before, inside and after the pruned stretch from
block 2): the plugin patches it when built, ratio 0 equals unpatched vLLM, its vision embeddings
(merger output and every DeepStack tap, concatenated as vLLM passes them) equal transformers'
``apply_ipcv`` on the same saved weights, and batched ``generate`` equals each request alone."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from PIL import Image

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.testing import assert_close, assert_close_to_reference
from ipcv_kernels.testing.models import sample_pixels
from ipcv_kernels.vllm.testing import ENGINE

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
CONFIG = ik.IPCVConfig(**SETTINGS)
GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2]],
    "video": [[2, 8, 8]],
}
PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8"
_fresh = itertools.count(2000)  # every check gets new pixels / images (vLLM caches encodings)


@pytest.fixture(scope="module")
def llm(qwen3_vl_path):
    from vllm import LLM

    return LLM(model=qwen3_vl_path, hf_overrides={"ipcv": SETTINGS}, **ENGINE)


@pytest.fixture(scope="module")
def hf_model(qwen3_vl_path):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(qwen3_vl_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_model64(hf_model):
    return copy.deepcopy(hf_model).to(torch.float64)


def encode(llm, hf_model, grid, config):
    """``(vLLM's embeddings, the pixels vLLM's blocks saw, grid, embed_multimodal's kwargs)`` with
    ``config`` (``None``: unpatched) on the running engine's model."""
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


def transformers_embeddings(tower, pixels, grid_thw):
    """What vLLM's tower returns: the merger's output and every DeepStack tap, ``[n / 4, 4 * D]``."""
    output = tower(pixels, grid_thw=grid_thw)
    return torch.cat([output.pooler_output, *output.deepstack_features], dim=1)


def test_plugin_patches_the_model_when_built(llm):
    assert llm.apply_model(lambda m: ik.get_ipcv_patch(m).config) == [CONFIG]
    assert llm.apply_model(lambda m: ikv.find_vllm_family(m)[0].name) == ["Qwen3-VL"]


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_ratio_zero_equals_unpatched(llm, hf_model, grid):
    expected, _, _, kwargs = encode(llm, hf_model, grid, None)
    zero = ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=3)
    with torch.no_grad():
        (got,) = llm.apply_model(lambda m: (ikv.apply_ipcv(m, zero), torch.cat(m.embed_multimodal(**kwargs)))[1])
    assert_close(got, expected)
    llm.apply_model(lambda m: ikv.apply_ipcv(m, CONFIG))


@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_vision_embeddings_equal_transformers(llm, hf_model, hf_model64, grid, as_layers):
    """The bound is derived as in the Qwen2.5-VL test (the same vLLM attention): vLLM's error
    against the float64 transformers tower is at most ``TOLERANCE_FACTOR`` times transformers'
    own fp32 error, plus the fp32 floor."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    got, normalised, grid_thw, _ = encode(llm, hf_model, grid, config)
    with torch.no_grad():
        with ik.ipcv_applied(hf_model, config):
            expected32 = transformers_embeddings(hf_model.model.visual, normalised, grid_thw)
        with ik.ipcv_applied(hf_model64, config):
            expected64 = transformers_embeddings(hf_model64.model.visual, normalised.double(), grid_thw)
    assert got.shape == expected64.shape
    assert_close_to_reference(got, expected64, expected32)
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)
    total = sum(t * h * w for t, h, w in grid)
    assert tokens[: config.prune_layer] == [total] * config.prune_layer
    assert all(count < total for count in tokens[config.prune_layer :])
    llm.apply_model(lambda m: ikv.apply_ipcv(m, CONFIG))


def random_image(height, width):
    generator = np.random.default_rng(next(_fresh))
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_generate_batched_equals_each_request_alone(llm):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0)
    images = [random_image(*size) for size in [(16, 24), (24, 16), (12, 12)]]

    def request(image, run):
        # A new uuid per run: vLLM keys its encoder cache by it, so every run encodes anew.
        return {"prompt": PROMPT, "multi_modal_data": {"image": image}, "multi_modal_uuids": {"image": [f"{run}"]}}

    calls = []
    (hook,) = llm.apply_model(lambda m: m.visual.register_forward_hook(lambda *_: calls.append(1)))
    try:
        batched = llm.generate([request(im, f"b{next(_fresh)}") for im in images], params, use_tqdm=False)
        batched_calls = len(calls)
        alone = [llm.generate(request(im, f"a{next(_fresh)}"), params, use_tqdm=False)[0] for im in images]
    finally:
        hook.remove()
    assert batched_calls < len(images)  # several requests' images shared an encoder call
    assert len(calls) == batched_calls + len(images)
    assert [out.outputs[0].token_ids for out in batched] == [out.outputs[0].token_ids for out in alone]
    assert len({tuple(out.outputs[0].token_ids) for out in alone}) > 1  # the images steer the tokens
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)
    assert tokens[-1] < tokens[0]
