"""IPCV in vLLM's own Qwen2-VL (CPU, fp32, eager): the plugin patches the model when vLLM builds
it; ratio 0 equals unpatched vLLM; with pruning, vLLM's vision embeddings equal transformers'
``apply_ipcv`` on the same saved weights (one image, several of different sizes in one encoder
call, a video); batched ``generate`` equals each request alone; ``generate`` with a video equals
transformers' greedy tokens; bad settings and bad requests."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from PIL import Image

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import sample_pixels
from ipcv_kernels.vllm.testing import ENGINE

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
CONFIG = ik.IPCVConfig(**SETTINGS)
GRIDS = {
    "one_image": ([[1, 4, 6]], False),
    "images_of_different_sizes": ([[1, 4, 6], [1, 6, 4], [1, 2, 2], [1, 8, 8]], False),
    "video": ([[3, 4, 4]], True),
}
PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8"
VIDEO_PROMPT = "w5 w6 <|vision_start|><|video_pad|><|vision_end|> w7 w8"
_fresh = itertools.count(100)  # every check gets new pixels / images (vLLM caches encodings)


@pytest.fixture(scope="module")
def llm(qwen2_vl_path):
    from vllm import LLM

    return LLM(model=qwen2_vl_path, hf_overrides={"ipcv": SETTINGS}, **ENGINE)


@pytest.fixture(scope="module")
def hf_model(qwen2_vl_path):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_path, dtype=torch.float32).eval()


@pytest.fixture
def with_config(llm):
    """``set(config)`` patches the running engine's model (``None``: unpatched); the plugin's
    setting is back afterwards."""

    def set_config(config):
        llm.apply_model(lambda m: ikv.remove_ipcv(m) if config is None else ikv.apply_ipcv(m, config))

    yield set_config
    set_config(CONFIG)


def vllm_embeddings(llm, grid, video=False):
    """What vLLM's model runner calls to encode: ``embed_multimodal``, one tensor per item."""
    pixels, grid_thw = sample_pixels(SimpleNamespace(**_vision_fields(llm)), grid, seed=next(_fresh))
    key = "video" if video else "image"
    kwargs = {"pixel_values_videos" if video else "pixel_values": pixels, f"{key}_grid_thw": grid_thw}

    def encode(model):
        # vLLM may normalise pixels on the device (``visual.input_norm``; its processor then skips
        # mean / std): transformers gets the pixels the tower's blocks actually see.
        normalised = model.visual.input_norm(pixels.clone(), model.visual.dtype)
        return torch.cat(model.embed_multimodal(**kwargs)).clone(), normalised

    with torch.no_grad():
        ((embeddings, normalised),) = llm.apply_model(encode)
    return embeddings, pixels, normalised, grid_thw


def _vision_fields(llm):
    (fields,) = llm.apply_model(
        lambda m: {
            name: getattr(m.config.vision_config, name) for name in ("in_channels", "temporal_patch_size", "patch_size")
        }
    )
    return fields


def random_image(height, width):
    generator = np.random.default_rng(next(_fresh))
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_plugin_patches_the_model_when_built(llm):
    (config,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).config)
    assert config == CONFIG  # missing fields: the family's recommended setting (IPCVConfig defaults)
    (family,) = llm.apply_model(lambda m: ikv.find_vllm_family(m)[0].name)
    assert family == "Qwen2-VL"


def test_get_ipcv_patch_is_none_when_unpatched(llm, with_config):
    with_config(None)
    assert llm.apply_model(ik.get_ipcv_patch) == [None]


@pytest.mark.parametrize("grid, video", GRIDS.values(), ids=GRIDS.keys())
def test_ratio_zero_equals_unpatched(llm, with_config, grid, video):
    with_config(None)
    expected, pixels, _, grid_thw = vllm_embeddings(llm, grid, video)
    with_config(ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=3))
    key = "video" if video else "image"
    kwargs = {"pixel_values_videos" if video else "pixel_values": pixels, f"{key}_grid_thw": grid_thw}
    with torch.no_grad():
        (got,) = llm.apply_model(lambda m: torch.cat(m.embed_multimodal(**kwargs)))
    assert_close(got, expected)


@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize("grid, video", GRIDS.values(), ids=GRIDS.keys())
def test_vision_embeddings_equal_transformers(llm, hf_model, with_config, grid, video, as_layers):
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    with_config(config)
    got, _, normalised, grid_thw = vllm_embeddings(llm, grid, video)
    with ik.ipcv_applied(hf_model, config), torch.no_grad():
        expected = hf_model.model.visual(normalised, grid_thw=grid_thw).pooler_output
    assert got.shape == expected.shape
    assert_close(got, expected)
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)
    total = sum(t * h * w for t, h, w in grid)
    assert tokens[: CONFIG.prune_layer] == [total] * CONFIG.prune_layer
    assert all(count < total for count in tokens[CONFIG.prune_layer :])


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
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)
    assert tokens[-1] < tokens[0]


def test_generate_with_a_video_equals_transformers(llm, hf_model, qwen2_vl_path):
    """A request carrying a video (frames ``uint8 [T, H, W, 3]``) through vLLM's processor and
    ``generate``: the video's embeddings inside ``generate`` equal the patched transformers
    tower's on the same video through transformers' processor, the tokens equal its greedy
    tokens, and the video's tokens are pruned. (The tiny model's tokens barely depend on the
    embeddings, so the embeddings are what shows the video went through IPCV alike.)"""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    video = np.random.default_rng(next(_fresh)).integers(0, 256, (4, 16, 24, 3), dtype=np.uint8)
    request = {
        "prompt": VIDEO_PROMPT,
        "multi_modal_data": {"video": video},
        "multi_modal_uuids": {"video": [f"v{next(_fresh)}"]},
    }
    encoded = []
    (hook,) = llm.apply_model(
        lambda m: m.visual.register_forward_hook(lambda module, args, out: encoded.append(out.clone()))
    )
    try:
        (output,) = llm.generate(request, SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    finally:
        hook.remove()
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)

    inputs = AutoProcessor.from_pretrained(qwen2_vl_path)(text=[VIDEO_PROMPT], videos=[video], return_tensors="pt")
    with ik.ipcv_applied(hf_model, CONFIG), torch.no_grad():
        expected_embeddings = hf_model.model.visual(
            inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"]
        ).pooler_output
        expected = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert len(encoded) == 1  # one encoder call, the video's
    assert_close(encoded[0], expected_embeddings)
    prompt = inputs["input_ids"][0].tolist()
    assert list(output.prompt_token_ids) == prompt  # the same placeholders for the video
    assert list(output.outputs[0].token_ids) == expected[0, len(prompt) :].tolist()
    ((t, h, w),) = inputs["video_grid_thw"].tolist()
    assert t > 1  # frames were paired, not dropped
    assert tokens[: CONFIG.prune_layer] == [t * h * w] * CONFIG.prune_layer
    assert all(count < t * h * w for count in tokens[CONFIG.prune_layer :])


def test_bad_request_does_not_take_the_engine_down(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    params = SamplingParams(max_tokens=3, temperature=0.0)
    with pytest.raises((ValueError, TypeError, VLLMValidationError)):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": "not an image"}}, params, use_tqdm=False)
    request = {"prompt": PROMPT, "multi_modal_data": {"image": random_image(16, 16)}}
    assert len(llm.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids) == 3


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_invalid_ipcv_dict_fails_at_engine_start(qwen2_vl_path):
    from vllm import LLM

    with pytest.raises(Exception) as raised:
        LLM(model=qwen2_vl_path, hf_overrides={"ipcv": {"ratio": 1.5}}, **ENGINE)
    assert any(isinstance(e, ValueError) and "ratio" in str(e) for e in _chain(raised.value))


def fake_vllm_config(ipcv, **compilation):
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(ipcv=ipcv)),
        compilation_config=SimpleNamespace(**compilation),
    )


@pytest.mark.parametrize(
    "ipcv, error, field",
    [
        ({"ratio": 1.5}, ValueError, "ratio"),
        ({"prune_layer": 99}, ValueError, "prune_layer"),
        ({"num_neighbours": 3}, TypeError, "num_neighbours"),
        ({"as_layers": "7"}, TypeError, "as_layers"),
        ([("ratio", 0.5)], TypeError, "ipcv"),
    ],
)
def test_invalid_settings_name_the_field(llm, ipcv, error, field):
    def apply(model):
        with pytest.raises(error, match=field):
            ikv.plugin.apply_from_config(model, fake_vllm_config(ipcv))
        return ik.get_ipcv_patch(model).config  # the model keeps its patch

    assert llm.apply_model(apply) == [CONFIG]


@pytest.mark.parametrize("setting", ["compile_mm_encoder", "cudagraph_mm_encoder"])
def test_compiled_or_graphed_encoder_is_refused(llm, setting):
    def apply(model):
        with pytest.raises(ValueError, match=setting):
            ikv.plugin.apply_from_config(model, fake_vllm_config(SETTINGS, **{setting: True}))

    llm.apply_model(apply)


def test_without_ipcv_key_nothing_changes(llm):
    def apply(model):
        return ikv.plugin.apply_from_config(model, fake_vllm_config(None)), ik.get_ipcv_patch(model).config

    assert llm.apply_model(apply) == [(None, CONFIG)]


def test_transformers_models_are_not_vllm_models(hf_model):
    assert not ikv.is_vllm_model(hf_model)
    with pytest.raises(TypeError, match="vLLM model"):
        ikv.apply_ipcv(hf_model, CONFIG)
