"""IPCV on CLIP / SigLIP towers, bare and inside LLaVA 1.5, LLaVA-NeXT, Gemma 3 and PaliGemma:
the unpatched model at ratio 0, the independent float64 spec oracle otherwise (CLIP's CLS pinned;
the layers the model reads restored; LLaVA-NeXT's crops of one image one item), a batch equal to
its items alone, removal, and generate."""

from __future__ import annotations

import pytest
import torch
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, build_tower
from ipcv_kernels.models.clip_vit import read_blocks
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import CLIP_PATCHES, clip_family_inputs, clip_pixels

CONFIGS = {
    "P1_r50_A0_k1": dict(prune_layer=1, ratio=0.5, as_layers=0, num_neighbors=1),
    "P2_r65_A2_k10": dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=10),
    "P3_r75_A1_k3": dict(prune_layer=3, ratio=0.75, as_layers=1, num_neighbors=3),
    "P1_r30_to_end_k4": dict(prune_layer=1, ratio=0.3, as_layers=99, num_neighbors=4),
}
RATIO_ZERO = ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4)


def sequence_length(family: str) -> int:
    return CLIP_PATCHES + (family == "clip")


def cls_rows(family: str, sequences: int) -> set[int]:
    return set(range(0, sequences * sequence_length(family), sequence_length(family))) if family == "clip" else set()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_bare_tower_ratio_zero_equals_unpatched(family, attn):
    tower = build_tower(family, attn=attn)
    pixels = clip_pixels(3)
    with torch.no_grad():
        expected = tower(pixels)
        with ik.ipcv_applied(tower, RATIO_ZERO):
            got = tower(pixels)
    assert type(got) is type(expected)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    if expected.pooler_output is not None:
        assert_close(got.pooler_output, expected.pooler_output)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_bare_tower_matches_float64_spec_oracle(family, config):
    # A bare tower: each batch element is one item.
    tower = build_tower(family, dtype=torch.float64)
    pixels = clip_pixels(3, dtype=torch.float64)
    items = [sequence_length(family)] * 3
    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, lambda: tower(pixels), items, pinned=cls_rows(family, 3), **config)
        with ik.ipcv_applied(tower, ik.IPCVConfig(**config)):
            got = tower(pixels)
    assert_close(got.last_hidden_state, expected.output.last_hidden_state)
    if family == "clip":
        assert_close(got.pooler_output, expected.output.pooler_output)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_bare_tower_batch_equals_items_alone(family):
    tower = build_tower(family)
    pixels = clip_pixels(3)
    with torch.no_grad(), ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=2, ratio=0.6, as_layers=1)):
        together = tower(pixels).last_hidden_state
        alone = torch.cat([tower(pixels[i : i + 1]).last_hidden_state for i in range(3)])
    assert_close(together, alone)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_remove_restores_exactly(family):
    tower = build_tower(family)
    pixels = clip_pixels(2)
    with torch.no_grad():
        expected = tower(pixels).last_hidden_state
        ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=1, ratio=0.7))
        assert not torch.equal(tower(pixels).last_hidden_state, expected)
        ik.remove_ipcv(tower)
        assert torch.equal(tower(pixels).last_hidden_state, expected)
    assert all("forward" not in vars(layer) for layer in tower.encoder.layers)


FULL_MODELS = ["llava", "gemma3", "paligemma"]


@pytest.mark.parametrize("family", FULL_MODELS)
def test_full_model_ratio_zero_equals_unpatched_and_generates(family):
    model = build_model(family)
    inputs = clip_family_inputs(model, 1 if family == "paligemma" else 2)
    with torch.no_grad():
        expected = model(**inputs).logits
        ik.apply_ipcv(model, RATIO_ZERO)
        assert_close(model(**inputs).logits, expected)
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3))
        pruned = model(**inputs).logits
        assert not torch.allclose(pruned, expected)  # the image features reach the logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    ik.remove_ipcv(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("family", FULL_MODELS)
def test_full_model_matches_float64_spec_oracle(family, config):
    model = build_model(family, dtype=torch.float64)
    tower = model.model.vision_tower
    images = 1 if family == "paligemma" else 2
    inputs = clip_family_inputs(model, images)
    items = [sequence_length("clip" if family == "llava" else "siglip")] * images
    pinned = cls_rows("clip" if family == "llava" else "siglip", images)
    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, lambda: model(**inputs), items, pinned=pinned, **config).output.logits
        with ik.ipcv_applied(model, ik.IPCVConfig(**config)):
            got = model(**inputs).logits
    assert_close(got, expected)


def test_llava_reads_its_feature_layer_restored_and_skips_the_blocks_after_it():
    # vision_feature_layer -2 is block depth-2's output: the last block need not run.
    model = build_model("llava")
    inputs = clip_family_inputs(model, 2)
    kept = 2 * (1 + CLIP_PATCHES // 2)
    with torch.no_grad(), ik.ipcv_applied(model, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1)):
        model(**inputs)
        assert ik.get_ipcv_patch(model).last_tokens_per_block == [34, 34, kept, kept, kept]  # 5 of 6 blocks ran


@pytest.mark.parametrize("layers", [[-2, -4], [-1, 3]])
def test_llava_several_feature_layers_each_read_restored(layers):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model = build_model("llava", dtype=torch.float64)
    model.config.vision_feature_layer = layers  # the projector reads the layers concatenated
    model.model.multi_modal_projector = LlavaMultiModalProjector(model.config).to(torch.float64)
    inputs = clip_family_inputs(model, 2)
    config = dict(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            model.model.vision_tower, lambda: model(**inputs), [17, 17], pinned={0, 17}, **config
        ).output.logits
        with ik.ipcv_applied(model, ik.IPCVConfig(**config)):
            got = model(**inputs).logits
    assert_close(got, expected)


def test_read_blocks():
    assert read_blocks(-2, 6) == (4,)
    assert read_blocks([-1, 0, 3], 6) == (5, -1, 2)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        read_blocks(-8, 6)


def test_llava_next_crops_of_one_image_form_one_item():
    # Two images: 32 x 64 (a base crop + 2 tiles) and 64 x 64 (a base crop + 4 tiles).
    model = build_model("llava_next", dtype=torch.float64)
    tower = model.model.vision_tower
    pixels = clip_pixels(10, dtype=torch.float64).view(2, 5, 3, 32, 32)
    sizes = torch.tensor([[32, 64], [64, 64]])
    config = dict(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=10)
    crops = [3, 5]
    items = [count * 17 for count in crops]
    pinned = set(range(0, 8 * 17, 17))

    def features():
        return model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output

    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, features, items, pinned=pinned, **config).output
        with ik.ipcv_applied(model, ik.IPCVConfig(**config)):
            got = features()
            kept = sum(count + count * CLIP_PATCHES // 2 for count in crops)
            assert ik.get_ipcv_patch(model).last_tokens_per_block == [136, 136, kept, kept, kept]
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b)


def test_family_table_and_recommended_config():
    for family in ("llava", "llava_next", "gemma3", "paligemma"):
        assert ik.recommended_config(build_model(family)) == ik.IPCVConfig()
    assert "CLIPVisionModel" in ik.supported_classes() and "LlavaForConditionalGeneration" in ik.supported_classes()
    with pytest.raises(TypeError, match="language model"):  # a bare tower has none
        ik.apply_ipcv(build_tower("clip"), llm_pruner=ik.FastV(layer=1, ratio=0.5))
