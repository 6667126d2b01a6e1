"""IPCV on LLaVA-OneVision (SigLIP tower, anyres crops): the unpatched model at ratio 0, the float64
spec oracle otherwise (all crops of one image one item, counted as the model counts them, also
with ``batch_num_images``; all frames of a video one item), a batch equal to its images alone,
removal, and generate."""

from __future__ import annotations

import pytest
import torch
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, find_family
from ipcv_kernels.models.clip_vit import anyres_crops
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import clip_pixels, onevision_inputs

RATIO_ZERO = ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4)
PRUNING = dict(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=10)
PATCHES = 16  # per 32 x 32 crop, no CLS
SIZES = [[32, 64], [64, 64]]  # a base crop + 2 grid crops, a base crop + 4 grid crops


def test_ratio_zero_equals_unpatched_and_generates():
    model = build_model("llava_onevision")
    inputs = onevision_inputs(model, SIZES)
    image_args = {key: inputs[key] for key in ("pixel_values", "image_sizes")}
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_features = model.model.get_image_features(**image_args).pooler_output
        ik.apply_ipcv(model, RATIO_ZERO)
        assert_close(model(**inputs).logits, expected)
        for got, want in zip(
            model.model.get_image_features(**image_args).pooler_output, expected_features, strict=True
        ):
            assert_close(got, want)  # the projected features, from the restored projector input
        ik.apply_ipcv(model, ik.IPCVConfig(**PRUNING))
        assert not torch.allclose(model(**inputs).logits, expected)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    ik.remove_ipcv(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize(
    ("batch_num_images", "crops"),
    [(None, [3, 5]), ([2], [1, 1])],  # one image each: anyres; two in one prompt: base crops only
    ids=["anyres", "multi_image"],
)
def test_crops_of_one_image_form_one_item_and_match_the_oracle(batch_num_images, crops):
    model = build_model("llava_onevision", dtype=torch.float64)
    inputs = onevision_inputs(model, SIZES, batch_num_images=batch_num_images)
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            model.model.vision_tower, lambda: model(**inputs), [count * PATCHES for count in crops], **PRUNING
        ).output.logits
        with ik.ipcv_applied(model, ik.IPCVConfig(**PRUNING)):
            got = model(**inputs).logits
            kept = sum(count * PATCHES // 2 for count in crops)
            assert ik.get_ipcv_patch(model).last_tokens_per_block == [sum(crops) * PATCHES] * 2 + [kept] * 4
    assert_close(got, expected)


def test_batch_of_images_equals_each_alone():
    model = build_model("llava_onevision")
    inputs = onevision_inputs(model, SIZES)
    pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
    with torch.no_grad(), ik.ipcv_applied(model, ik.IPCVConfig(**PRUNING)):
        together = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        alone = [
            model.model.get_image_features(pixel_values=pixels[i : i + 1], image_sizes=sizes[i : i + 1]).pooler_output[
                0
            ]
            for i in range(2)
        ]
    for a, b in zip(together, alone, strict=True):
        assert_close(a, b)


def test_frames_of_a_video_form_one_item():
    model = build_model("llava_onevision", dtype=torch.float64)
    videos = clip_pixels(6, dtype=torch.float64).view(2, 3, 3, 32, 32)  # 2 videos of 3 frames

    def features():
        return model.model.get_video_features(videos).pooler_output  # named pixel_values in transformers 5.17

    with torch.no_grad():
        unpatched = features()
        with ik.ipcv_applied(model, RATIO_ZERO):
            assert_close(features(), unpatched)
        expected = ipcv_tower_oracle(model.model.vision_tower, features, [3 * PATCHES] * 2, **PRUNING).output
        with ik.ipcv_applied(model, ik.IPCVConfig(**PRUNING)):
            got = features()
    assert_close(got, expected)


def test_anyres_crops_counts_as_the_model():
    model = build_model("llava_onevision")
    holder = model.model
    assert anyres_crops(holder, torch.tensor(SIZES), None) == [3, 5]
    assert anyres_crops(holder, torch.tensor(SIZES), torch.tensor([2])) == [1, 1]
    assert anyres_crops(holder, torch.tensor(SIZES), [1, 1]) == [3, 5]
    with pytest.raises(ValueError, match="batch_num_images"):
        anyres_crops(holder, torch.tensor(SIZES), [3])


def test_family_table_and_recommended_config():
    model = build_model("llava_onevision")
    assert ik.recommended_config(model) == ik.IPCVConfig()
    assert "LlavaOnevisionForConditionalGeneration" in ik.supported_classes()
    assert find_family(model)[0].name == "LLaVA-OneVision"
