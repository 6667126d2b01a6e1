"""Mistral 3 / Pixtral beyond the family table's checks (``docs/spec.md`` §5.11): the read layer
``vision_feature_layer`` (a read block restores, later blocks are skipped), images of different
sizes in one ``get_image_features`` call equal each alone (each image its own item and segment,
the padded batch cropped by ``image_sizes``), the pruned blocks' block-diagonal mask over the
kept rows of each image, and the tower classes the adapter refuses."""

from __future__ import annotations

import pytest
import torch

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, build_tower
from ipcv_kernels.models.pixtral import PixtralAdapter, block_diagonal_mask
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing import models as tiny

CONFIG = ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
SIZES = [(16, 24), (24, 16), (8, 16)]  # pixels: 4-pixel patches, 2 x 2 merged


def images(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of ``sizes``, zero-padded to one batch, and their ``image_sizes``."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, (height, width) in enumerate(sizes):
        pixels[i, :, :height, :width] = torch.randn(3, height, width, generator=generator)
    return pixels, torch.tensor(sizes)


def features(model, pixels, image_sizes, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            model.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes, **kwargs).pooler_output
        )


def test_images_of_different_sizes_equal_each_alone():
    model = build_model("mistral3")
    pixels, image_sizes = images(SIZES)
    ik.apply_ipcv(model, CONFIG)
    together = features(model, pixels, image_sizes)
    tokens = ik.get_ipcv_patch(model).last_tokens_per_block
    # Each image cut out of the batch (its own size, no padding).
    alone = [features(model, pixels[i : i + 1, :, :h, :w], image_sizes[i : i + 1]) for i, (h, w) in enumerate(SIZES)]
    assert_close(together, torch.cat(alone))
    patches = sum(h * w for h, w in SIZES) // 16
    kept = sum(max(1, int(h * w // 16 * 0.5)) for h, w in SIZES)
    assert tokens == [patches] * CONFIG.prune_layer + [kept] * (6 - CONFIG.prune_layer)


@pytest.mark.parametrize("layer", [-1, -2])
def test_read_layer_is_restored_and_later_blocks_skipped(layer):
    """``vision_feature_layer`` -2 reads block 4 of 0-5: it returns the restored sequence (every
    image's features, all tokens) and block 5 does not run (changing its weights changes nothing).
    Ratio 0 equals the unpatched model. (transformers' Mistral 3 normalises one layer's width:
    a list of layers does not run there.)"""
    import transformers

    torch.manual_seed(0)
    config = transformers.Mistral3Config(**{**tiny.mistral3_fields({}), "vision_feature_layer": layer})
    model = transformers.Mistral3ForConditionalGeneration(config)
    tiny.jitter(model, 0)
    model = tiny.finish(model, "sdpa", torch.float32)
    pixels, image_sizes = images(SIZES[:2], seed=1)
    expected = features(model, pixels, image_sizes)
    with ik.ipcv_applied(model, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=1, num_neighbors=3)):
        assert torch.equal(features(model, pixels, image_sizes), expected)
    ik.apply_ipcv(model, CONFIG)
    got = features(model, pixels, image_sizes)
    tokens = ik.get_ipcv_patch(model).last_tokens_per_block
    assert got.shape == expected.shape and not torch.allclose(got, expected)
    read = 6 + layer  # the block whose output hidden_states[layer] is (6 blocks, 7 entries)
    assert len(tokens) == read + 1  # the blocks after it return their input untouched
    with torch.no_grad():
        model.model.vision_tower.transformer.layers[5].feed_forward.down_proj.weight.mul_(2)
    changed = features(model, pixels, image_sizes)
    assert torch.equal(changed, got) if layer == -2 else not torch.allclose(changed, got)


def test_pruned_blocks_attend_within_each_image_over_its_kept_rows():
    """The mask of a pruned block: 0 inside each image's kept rows, the dtype's minimum across."""
    mask = block_diagonal_mask(torch.tensor([0, 2, 2, 5], dtype=torch.int32), torch.zeros(1, dtype=torch.float64))
    allowed = mask[0, 0] == 0
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :2] = expected[2:, 2:] = True
    assert mask.shape == (1, 1, 5, 5) and torch.equal(allowed, expected)
    assert mask[0, 0, 0, 4] == torch.finfo(torch.float64).min


def test_the_adapter_takes_pixtral_towers_only():
    with pytest.raises(TypeError, match="PixtralVisionModel"):
        PixtralAdapter().blocks(build_tower("clip"))
    tower = build_tower("mistral3")
    with pytest.raises(ValueError, match="image_sizes"), ik.ipcv_applied(tower, CONFIG):
        tower(torch.zeros(2, 3, 8, 8), image_sizes=torch.tensor([[8, 8]]))


@pytest.mark.parametrize(
    "pruner",
    [ik.FastV(layer=1, ratio=0.6), ik.DART(layer=1, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)],
    ids=["fastv", "dart"],
)
def test_llm_pruners_on_the_mistral_decoder(pruner):
    """FastV / DART on Mistral 3's decoder (a Mistral, standard causal attention): the pruned
    prefill equals the masked-attention oracle (fp64) at the kept positions, the ``[IMG]`` tokens
    are the candidates (``[IMG_BREAK]`` / ``[IMG_END]`` are text), and generation with IPCV in the
    tower decodes at the unpruned positions."""
    from test_llm_pruners import check_generation, image_token_count, llm_keep_count, logits, masked_attention_logits

    model = build_model("mistral3", dtype=torch.float64)
    inputs = tiny.mistral3_prompt(model, 2, 0)
    ik.apply_ipcv(model, llm_pruner=pruner)
    pruned = logits(model, inputs)
    kept = ik.get_llm_pruning_patch(model).last_kept[0]
    ik.remove_ipcv(model)
    images = image_token_count(model, inputs)
    assert kept.shape[0] == inputs["input_ids"].shape[1] - images + llm_keep_count(images, pruner.ratio)
    assert_close(pruned[0, kept], masked_attention_logits(model, inputs, kept, pruner.layer)[0, kept])
    check_generation(build_model("mistral3"), pruner, inputs=tiny.mistral3_prompt(build_model("mistral3"), 1, 0))
