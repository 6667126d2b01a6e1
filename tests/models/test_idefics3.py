"""IPCV on Idefics3 / SmolVLM towers (SigLIP layers, padding patches), bare and inside their full
models: the unpatched model at ratio 0 (padding patches stay masked as keys), the float64 spec
oracle otherwise (padding pinned and never a key; the real sub-images of a prompt one item), a
batch equal to its items alone, removal, and generate."""

from __future__ import annotations

import pytest
import torch
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, build_tower
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import idefics3_inputs, idefics3_pixels

FAMILIES = ["idefics3", "smolvlm"]
CONFIGS = {
    "P1_r50_A0_k1": dict(prune_layer=1, ratio=0.5, as_layers=0, num_neighbors=1),
    "P2_r65_A2_k10": dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=10),
    "P3_r75_A1_k3": dict(prune_layer=3, ratio=0.75, as_layers=1, num_neighbors=3),
}
RATIO_ZERO = ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4)
PATCHES = 16  # per 32 x 32 sub-image


def tower_inputs(count: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sub-images ``[count, 3, 32, 32]``, the last with its right patch column padding,
    and their ``patch_attention_mask`` ``[count, 4, 4]``."""
    pixels, mask = idefics3_pixels([count], padded_columns=8, dtype=dtype)
    patch_mask = mask[0].unfold(1, 8, 8).unfold(2, 8, 8).sum((-1, -2)) > 0
    return pixels[0], patch_mask


def padding_rows(patch_mask: torch.Tensor) -> set[int]:
    return set((~patch_mask.reshape(-1)).nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bare_tower_ratio_zero_equals_unpatched(family, attn):
    tower = build_tower(family, attn=attn)
    pixels, patch_mask = tower_inputs(3)
    with torch.no_grad():
        for mask in (patch_mask, None):
            expected = tower(pixels, patch_attention_mask=mask).last_hidden_state
            with ik.ipcv_applied(tower, RATIO_ZERO):
                assert_close(tower(pixels, patch_attention_mask=mask).last_hidden_state, expected)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_bare_tower_matches_float64_spec_oracle(family, config):
    # A bare tower: each sub-image one item; the padding patches pinned and never keys.
    tower = build_tower(family, dtype=torch.float64)
    pixels, patch_mask = tower_inputs(3, dtype=torch.float64)
    padding = padding_rows(patch_mask)
    assert len(padding) == 4

    def call():
        return tower(pixels, patch_attention_mask=patch_mask)

    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, call, [PATCHES] * 3, pinned=padding, key_padding=padding, **config)
        # With the counts set, the first two sub-images form one item (one image).
        grouped = ipcv_tower_oracle(tower, call, [2 * PATCHES, PATCHES], pinned=padding, key_padding=padding, **config)
        with ik.ipcv_applied(tower, ik.IPCVConfig(**config)):
            got = call().last_hidden_state
            keep = ik.get_ipcv_patch(tower).last_keep
            ik.set_tiles_per_image(tower, [2, 1])
            got_grouped = call().last_hidden_state
    assert padding <= set(keep.tolist())
    assert_close(got, expected.output.last_hidden_state)
    assert_close(got_grouped, grouped.output.last_hidden_state)


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_tower_batch_equals_items_alone(family):
    tower = build_tower(family)
    pixels, patch_mask = tower_inputs(3)
    with torch.no_grad(), ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=2, ratio=0.6, as_layers=1)):
        together = tower(pixels, patch_attention_mask=patch_mask).last_hidden_state
        alone = [
            tower(pixels[i : i + 1], patch_attention_mask=patch_mask[i : i + 1]).last_hidden_state for i in range(3)
        ]
    assert_close(together, torch.cat(alone))


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_exactly(family):
    tower = build_tower(family)
    pixels, patch_mask = tower_inputs(2)
    with torch.no_grad():
        expected = tower(pixels, patch_attention_mask=patch_mask).last_hidden_state
        ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=1, ratio=0.7))
        assert not torch.equal(tower(pixels, patch_attention_mask=patch_mask).last_hidden_state, expected)
        ik.remove_ipcv(tower)
        assert torch.equal(tower(pixels, patch_attention_mask=patch_mask).last_hidden_state, expected)
    assert all("forward" not in vars(layer) for layer in tower.encoder.layers)


def test_bad_patch_attention_mask_raises():
    tower = build_tower("idefics3")
    pixels, patch_mask = tower_inputs(2)
    with torch.no_grad(), ik.ipcv_applied(tower, RATIO_ZERO), pytest.raises(ValueError, match="patch_attention_mask"):
        tower(pixels, patch_attention_mask=patch_mask[:, :2])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_model_ratio_zero_equals_unpatched_and_generates(family):
    # Two prompts: 2 and 1 real sub-images (the second prompt's row holds a padding image).
    model = build_model(family)
    inputs = idefics3_inputs(model, [2, 1], padded_columns=8)
    image_args = {key: inputs[key] for key in ("pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_features = model.model.get_image_features(**image_args)
        ik.apply_ipcv(model, RATIO_ZERO)
        assert_close(model(**inputs).logits, expected)
        features = model.model.get_image_features(**image_args)
        assert_close(features.last_hidden_state, expected_features.last_hidden_state)  # the connector's input
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3))
        assert not torch.allclose(model(**inputs).logits, expected)  # the image features reach the logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    ik.remove_ipcv(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_full_model_matches_float64_spec_oracle(family, config):
    # The real sub-images of each prompt form one item: [2, 1] sub-images, the last of each padded.
    model = build_model(family, dtype=torch.float64)
    inputs = idefics3_inputs(model, [2, 1], padded_columns=8)
    real = inputs["pixel_attention_mask"].view(-1, 32, 32)[[0, 1, 2]]  # the row of prompt 1 ends in a padding image
    padding = padding_rows(real.unfold(1, 8, 8).unfold(2, 8, 8).sum((-1, -2)) > 0)
    assert len(padding) == 8
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            model.model.vision_model,
            lambda: model(**inputs),
            [2 * PATCHES, PATCHES],
            pinned=padding,
            key_padding=padding,
            **config,
        ).output.logits
        with ik.ipcv_applied(model, ik.IPCVConfig(**config)):
            got = model(**inputs).logits
    assert_close(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_tiles_per_image_splits_a_prompt_into_its_images(family):
    # One prompt of 3 real sub-images holding two images (2 + 1 sub-images): with the counts set,
    # each image is its own item, as the float64 oracle with items [2 * PATCHES, PATCHES] says.
    config = CONFIGS["P2_r65_A2_k10"]
    model = build_model(family, dtype=torch.float64)
    inputs = idefics3_inputs(model, [3], padded_columns=8)
    real = inputs["pixel_attention_mask"].view(-1, 32, 32)
    padding = padding_rows(real.unfold(1, 8, 8).unfold(2, 8, 8).sum((-1, -2)) > 0)
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            model.model.vision_model,
            lambda: model(**inputs),
            [2 * PATCHES, PATCHES],
            pinned=padding,
            key_padding=padding,
            **config,
        ).output.logits
        with ik.ipcv_applied(model, ik.IPCVConfig(**config)):
            one_item = model(**inputs).logits
            ik.set_tiles_per_image(model, [2, 1])
            got = model(**inputs).logits
            ik.set_tiles_per_image(model, None)
            assert torch.equal(model(**inputs).logits, one_item)  # back to the prompt as one item
    assert_close(got, expected)
    assert not torch.allclose(one_item, expected)


def test_set_tiles_per_image_checks_the_call():
    model = build_model("idefics3")
    inputs = idefics3_inputs(model, [2, 1], padded_columns=8)
    with torch.no_grad(), ik.ipcv_applied(model, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1)):
        ik.set_tiles_per_image(model, [1, 2])  # adds up to 3, but an image would span both prompts
        with pytest.raises(ValueError, match="split each prompt"):
            model(**inputs)
        ik.set_tiles_per_image(model, [2, 2])
        with pytest.raises(ValueError, match="add up to the call's 3 sub-images"):
            model(**inputs)
        ik.set_tiles_per_image(model, [2, 1])
        model(**inputs)
        with pytest.raises(TypeError, match="positive ints"):
            ik.set_tiles_per_image(model, [2, 0])
    with pytest.raises(TypeError, match="patched with apply_ipcv"):
        ik.set_tiles_per_image(model, [2, 1])  # removed with the patch
    with pytest.raises(TypeError, match="InternVL, Idefics3 or SmolVLM"):
        ik.set_tiles_per_image(build_tower("clip"), [1])


def test_real_sub_images_of_a_prompt_form_one_item():
    # Prompts with 2 and 1 real sub-images: 32 - 4 and 16 - 4 unpinned rows, half of each kept.
    model = build_model("smolvlm")
    inputs = idefics3_inputs(model, [2, 1], padded_columns=8)
    with torch.no_grad(), ik.ipcv_applied(model, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1)):
        model(**inputs)
        kept = (14 + 4) + (6 + 4)
        assert ik.get_ipcv_patch(model).last_tokens_per_block == [48, 48, kept, kept, kept, kept]


def test_family_table_and_recommended_config():
    for family in FAMILIES:
        assert ik.recommended_config(build_model(family)) == ik.IPCVConfig()
        assert ik.recommended_config(build_tower(family)) == ik.IPCVConfig()
    for name in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration", "SmolVLMVisionTransformer"):
        assert name in ik.supported_classes()
