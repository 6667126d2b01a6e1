"""IPCV on Llama 4's tower (``Llama4VisionModel``: fixed tiles with a CLS token appended last, complex
2-D rotary, a pixel-shuffle MLP after the blocks), beyond what the family table's tests check:
every tile's last row (its CLS) pinned, never counted and never a neighbour; the tiles of each image
of a prompt one item, read from ``input_ids``; the pixel-shuffle adapter seeing the restored rows;
the rotary equal to the model's; block calls by keyword; concurrent full-model calls equal to serial
ones (each reads its own prompt's tiles); FastV / DART refused on the decoder."""

from __future__ import annotations

import threading

import pytest
import torch
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, build_tower
from ipcv_kernels.models.llama4 import complex_rope, image_tile_counts_between
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import LLAMA4_TOKENS, llama4_inputs, llama4_prompt

PRUNING = ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
TILE = 17  # 4 x 4 patches and the CLS token


def tiles(count: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_cls_is_the_last_row_of_every_tile_pinned_and_never_a_neighbour():
    """At a ratio that drops all but one patch row per item, every tile's last row (its CLS token)
    is still kept, not counted: 3 tiles as one item keep int(48 * 0.1) = 4 patch rows + 3 CLS rows;
    the first row of a tile (a patch) is dropped where it is not chosen."""
    tower = build_tower("llama4")
    config = ik.IPCVConfig(prune_layer=2, ratio=0.9, as_layers=1, num_neighbors=3)
    with torch.no_grad(), ik.ipcv_applied(tower, config):
        tower(tiles(3))
        patch = ik.get_ipcv_patch(tower)
        keep = patch.last_keep.tolist()
    cls_rows = [t * TILE + TILE - 1 for t in range(3)]
    assert set(cls_rows) <= set(keep)
    assert len(keep) == int(48 * 0.1) + 3
    assert patch.last_tokens_per_block[-1] == len(keep)


def test_cls_last_against_the_float64_oracle_at_several_settings():
    """The oracle with the last row of every tile pinned (and nothing else), two images of 3 and
    1 tiles as two items, and another prune layer and ratio than the table's test."""
    tower = build_tower("llama4", dtype=torch.float64)
    pixels = tiles(4, torch.float64)
    settings = dict(prune_layer=3, ratio=0.7, as_layers=1, num_neighbors=4)
    pinned = {t * TILE + TILE - 1 for t in range(4)}
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            tower, lambda: tower(pixels).last_hidden_state, [3 * TILE, TILE], pinned=pinned, **settings
        )
        with ik.ipcv_applied(tower, ik.IPCVConfig(**settings)), ik.get_ipcv_patch(tower).hinted(tiles_per_image=[3, 1]):
            got = tower(pixels).last_hidden_state
    assert_close(got, expected.output, dtype=torch.float32)


def test_tile_counts_are_read_from_input_ids():
    ids = llama4_inputs(build_model("llama4"), [(1, 2), (1, 1), (2, 2)])["input_ids"]
    tokens = (LLAMA4_TOKENS["image_token_index"], LLAMA4_TOKENS["boi_token_index"], LLAMA4_TOKENS["eoi_token_index"])
    assert image_tile_counts_between(ids, *tokens, 3 + 1 + 5) == [3, 1, 5]
    assert image_tile_counts_between(ids, *tokens, 8) is None  # not whole tiles
    assert image_tile_counts_between(ids[:, :-8], *tokens, 9) is None  # an image left open


def test_each_image_of_a_prompt_is_one_item():
    """The model's tower call equals the tower called on each image's tiles alone (each image its
    own item, as ``input_ids`` says), and differs from the call as one item."""
    model = build_model("llama4")
    inputs = llama4_prompt(model, 2)  # 3 tiles, then 1
    tower = model.vision_model
    seen = []
    handle = tower.vision_adapter.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad(), ik.ipcv_applied(model, PRUNING):
            model(**inputs)
            pixels = inputs["pixel_values"]
            first, second = tower(pixels[:3]).last_hidden_state, tower(pixels[3:]).last_hidden_state
            together = tower(pixels).last_hidden_state  # a bare call: all tiles one item
    finally:
        handle.remove()
    assert_close(seen[0], torch.cat([first, second]))
    assert not torch.allclose(seen[0], together)


def test_pixel_shuffle_sees_the_restored_rows():
    """The adapter's input holds every patch row of every tile, equal to the oracle's restored
    last block after the final norm with the CLS row dropped."""
    tower = build_tower("llama4", dtype=torch.float64)
    pixels = tiles(2, torch.float64)
    settings = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=3)
    pinned = {TILE - 1, 2 * TILE - 1}
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            tower, lambda: tower(pixels).last_hidden_state, [2 * TILE], pinned=pinned, **settings
        )
        seen = []
        handle = tower.vision_adapter.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            with ik.ipcv_applied(tower, ik.IPCVConfig(**settings)):
                tower(pixels)
        finally:
            handle.remove()
    restored = tower.layernorm_post(expected.full[-1].view(2, TILE, -1))[:, :-1]
    assert seen[0].shape == (2, TILE - 1, tower.config.hidden_size)
    assert_close(seen[0], restored, dtype=torch.float32)


def test_rotary_equals_the_models():
    from transformers.models.llama4.modeling_llama4 import vision_apply_rotary_emb

    tower = build_tower("llama4")
    freqs = tower.rotary_embedding.freqs_ci
    assert freqs.is_complex()  # kept complex by the tiny builder, as the model builds it
    x = torch.randn(1, TILE, 4, 16, generator=torch.Generator().manual_seed(3))
    expected, _ = vision_apply_rotary_emb(x, x, freqs)
    table = freqs.reshape(TILE, -1)
    assert torch.equal(complex_rope(x[0], table.real, table.imag), expected[0])


def test_blocks_called_by_keyword_return_tuples_and_removal_is_exact():
    tower = build_tower("llama4")
    pixels = tiles(2)
    with torch.no_grad():
        expected = tower(pixels, output_hidden_states=True)
        ik.apply_ipcv(tower, PRUNING)
        pruned = tower(pixels, output_hidden_states=True)
        ik.remove_ipcv(tower)
        again = tower(pixels).last_hidden_state
    assert pruned.last_hidden_state.shape == expected.last_hidden_state.shape
    assert len(pruned.hidden_states) == len(expected.hidden_states)
    assert torch.equal(again, expected.last_hidden_state)


def test_llm_pruners_are_refused_with_the_reason():
    model = build_model("llama4")
    with pytest.raises(TypeError, match="NoPE"):
        ik.apply_ipcv(model, PRUNING, llm_pruner=ik.FastV(layer=1, ratio=0.5))


def test_concurrent_full_model_calls_equal_serial_ones():
    """Two prompts of different tile layouts, each from its own thread several times at once: every
    output equals the serial one exactly (the tiles per image are per call, not per patch)."""
    model = build_model("llama4")
    ik.apply_ipcv(model, PRUNING)
    prompts = [llama4_inputs(model, [(1, 2), (1, 1)], seed=0), llama4_inputs(model, [(1, 1), (2, 2)], seed=1)]
    with torch.no_grad():
        expected = [model(**inputs).logits for inputs in prompts]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    results[index].append(model(**prompts[index]).logits)
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, outputs in results.items():
        assert len(outputs) == 3 and all(torch.equal(output, expected[index]) for output in outputs)
