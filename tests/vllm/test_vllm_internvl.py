"""IPCV in vLLM's InternVL: transformers' native format (``InternVLForConditionalGeneration``),
which vLLM builds as ``InternS1ForConditionalGeneration`` (InternViT in ``interns1_vit``: batched
tiles with CLS, layer scales, QK RMSNorm). The plugin patches it when built; ratio 0 equals
unpatched vLLM; with pruning, vLLM's vision embeddings (after ``pixel_shuffle`` and the projector)
equal transformers' ``apply_ipcv`` on the same saved weights with the same items (each image's
tiles one item, each video frame one item); batched ``generate`` equals each request alone."""

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
from ipcv_kernels.testing.models import INTERNVL_IMAGE_TOKEN, internvl_tiles
from ipcv_kernels.vllm.testing import ENGINE, INTERNVL_SPECIAL_TOKENS, INTERNVL_TILE

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
CONFIG = ik.IPCVConfig(**SETTINGS)
# Tiles per item of one encoder call: images (tiles, thumbnail included), or a video's frames.
CALLS = {
    "one_image": ([3], False),
    "images_of_different_sizes": ([3, 1, 5], False),
    "video": ([4], True),
}
PROMPT = "w5 w6 <IMG_CONTEXT> w7 w8"
TILE_ROWS = 1 + 4 * 4  # CLS + 4 x 4 patches
_fresh = itertools.count(3000)  # every check gets new pixels / images (vLLM caches encodings)


@pytest.fixture(scope="module")
def llm(internvl_path):
    from vllm import LLM

    return LLM(model=internvl_path, hf_overrides={"ipcv": SETTINGS}, **ENGINE)


@pytest.fixture(scope="module")
def hf_model(internvl_path):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(internvl_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_model64(hf_model):
    return copy.deepcopy(hf_model).to(torch.float64)


def encode(llm, counts, video, config):
    """``(vLLM's embeddings, the tiles, the tiles of each item in transformers)`` with ``config``
    (``None``: unpatched) on the running engine's model, through ``embed_multimodal``."""
    tiles = internvl_tiles(sum(counts), seed=next(_fresh))
    if video:
        video_token = INTERNVL_SPECIAL_TOKENS["<video>"]
        kwargs = {"pixel_values_videos": tiles, "video_num_patches": torch.tensor(counts)}
        kwargs["video_token_id"] = torch.tensor(video_token)
        items = [1] * sum(counts)  # every frame is its own run of image tokens in transformers
    else:
        kwargs = {"pixel_values": tiles, "image_num_patches": torch.tensor(counts)}
        kwargs["image_token_id"] = torch.tensor(INTERNVL_IMAGE_TOKEN)
        items = counts

    def run(model):
        ikv.remove_ipcv(model) if config is None else ikv.apply_ipcv(model, config)
        return torch.cat(model.embed_multimodal(**kwargs)).clone()

    with torch.no_grad():
        (embeddings,) = llm.apply_model(run)
    return embeddings, tiles, items, kwargs


def transformers_embeddings(model, tiles, items, config):
    """transformers' image features ``[tiles * 4, D]`` under ``config`` with ``items`` tiles per item."""
    with ik.ipcv_applied(model, config):
        ik.set_tiles_per_image(model, items)
        features = model.model.get_image_features(
            pixel_values=tiles.to(model.dtype), vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
    return features.pooler_output.reshape(-1, features.pooler_output.shape[-1])


def test_plugin_patches_the_model_when_built(llm):
    assert llm.apply_model(lambda m: ik.get_ipcv_patch(m).config) == [CONFIG]
    assert llm.apply_model(lambda m: ikv.find_vllm_family(m)[0].name) == ["InternVL"]


def test_recommended_setting_is_the_papers_internvl2_one(llm):
    recommended = llm.apply_model(ikv.recommended_vllm_config)
    assert recommended == [ik.IPCVConfig(prune_layer=7, ratio=0.65, as_layers=3, num_neighbors=10)]


@pytest.mark.parametrize("counts, video", CALLS.values(), ids=CALLS.keys())
def test_ratio_zero_equals_unpatched(llm, counts, video):
    expected, _, _, kwargs = encode(llm, counts, video, None)
    zero = ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=3)
    with torch.no_grad():
        (got,) = llm.apply_model(lambda m: (ikv.apply_ipcv(m, zero), torch.cat(m.embed_multimodal(**kwargs)))[1])
    assert_close(got, expected)
    llm.apply_model(lambda m: ikv.apply_ipcv(m, CONFIG))


@pytest.mark.parametrize("scope", ["image", "authors"])
@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize("counts, video", CALLS.values(), ids=CALLS.keys())
def test_vision_embeddings_equal_transformers(llm, hf_model, hf_model64, counts, video, as_layers, scope):
    """Blocks before ``P`` run vLLM's own layers (its attention and RMSNorm round differently
    from transformers'), so the bound is derived as in the Qwen2.5-VL test: vLLM's error against
    the float64 transformers tower is at most ``TOLERANCE_FACTOR`` times transformers' own fp32
    error, plus the fp32 floor."""
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers, "scope": scope})
    got, tiles, items, _ = encode(llm, counts, video, config)
    with torch.no_grad():
        expected32 = transformers_embeddings(hf_model, tiles, items, config)
        expected64 = transformers_embeddings(hf_model64, tiles, items, config)
    assert got.shape == expected64.shape
    assert_close_to_reference(got, expected64, expected32)
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)
    total = sum(counts) * TILE_ROWS
    assert tokens[: config.prune_layer] == [total] * config.prune_layer
    assert all(count < total for count in tokens[config.prune_layer :])
    llm.apply_model(lambda m: ikv.apply_ipcv(m, CONFIG))


def test_items_follow_the_images_of_the_call(llm, hf_model):
    """The same tiles grouped as vLLM's ``image_num_patches`` say: a different grouping of the
    same tiles gives other embeddings, so each image is its own item."""
    got, tiles, items, _ = encode(llm, [2, 3], False, CONFIG)
    with torch.no_grad():
        as_one_item = transformers_embeddings(hf_model, tiles, [5], CONFIG)
        per_image = transformers_embeddings(hf_model, tiles, items, CONFIG)
    assert not torch.allclose(got, as_one_item, atol=1e-3)
    assert_close(got, per_image)


def random_image(height, width):
    generator = np.random.default_rng(next(_fresh))
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_generate_batched_equals_each_request_alone(llm):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0)
    sizes = [(INTERNVL_TILE, 3 * INTERNVL_TILE), (2 * INTERNVL_TILE, INTERNVL_TILE), (INTERNVL_TILE, INTERNVL_TILE)]
    images = [random_image(*size) for size in sizes]

    def request(image, run):
        # A new uuid per run: vLLM keys its encoder cache by it, so every run encodes anew.
        return {"prompt": PROMPT, "multi_modal_data": {"image": image}, "multi_modal_uuids": {"image": [f"{run}"]}}

    calls = []
    (hook,) = llm.apply_model(lambda m: m.vision_tower.register_forward_hook(lambda *_: calls.append(1)))
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
