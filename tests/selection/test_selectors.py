"""Token selectors (``IPCVConfig.selection``): every built-in against its reference, alone and
through every family kind (a grid with windows and a video, tiles with CLS, crops with CLS,
sub-images with padding) against the float64 spec oracle fed the reference's scores; the grid and
pinned rows each adapter hands a selector; a batch equal to its items alone; the registry; bad
selectors refused by name, leaving the next forward correct; the ops compiled with a custom
selector."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from oracles.towers import build_tower, internvl_tiles, ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels import selectors
from ipcv_kernels.reference.selectors import (
    coarse_to_fine_key,
    diff_scores_reference,
    norm_scores_reference,
    random_scores_reference,
    uniform_scores_reference,
)
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import clip_pixels, idefics3_pixels, sample_pixels

BUILT_INS = ("diff", "norm", "random", "uniform")
CONFIG = dict(prune_layer=2, ratio=0.6, as_layers=1, num_neighbors=3)


def reference_score_fn(selection: str, cu_items: torch.Tensor, grid: torch.Tensor, pinned: torch.Tensor, seed=0):
    """The oracle's ``score_fn`` for a built-in: its reference on the oracle's own states."""

    def score(x_before: torch.Tensor, x_after: torch.Tensor) -> torch.Tensor:
        if selection == "diff":
            return diff_scores_reference(x_before, x_after)
        if selection == "norm":
            return norm_scores_reference(x_after)
        if selection == "random":
            return random_scores_reference(cu_items, seed, x_after.dtype)
        return uniform_scores_reference(cu_items, grid, pinned, x_after.dtype)

    return score


# -- the built-ins against their references ------------------------------------------------------
def random_call(seed: int = 0) -> selectors.SelectionInputs:
    """Two items over four parts of different grids, a CLS row per part, one padding row."""
    generator = torch.Generator().manual_seed(seed)
    parts = [(2, 3, 5), (1, 6, 6), (1, 1, 1)]  # (count, rows, cols); the last: a one-patch part
    grid = selectors.token_grid(parts, cls=True)
    n = grid.shape[0]
    cls_rows = (grid[:, 0] < 0).nonzero().squeeze(1)
    pinned = torch.cat([cls_rows, torch.tensor([20])]).unique()
    cu_items = torch.tensor([0, 2 * 16, n], dtype=torch.int32)
    x_before = torch.randn(n, 8, generator=generator)
    return selectors.SelectionInputs(
        x_before, x_before + torch.randn(n, 8, generator=generator), cu_items, pinned, grid
    )


@pytest.mark.parametrize("selection", BUILT_INS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_built_in_matches_its_reference(selection, dtype):
    inputs = random_call()
    inputs = selectors.SelectionInputs(
        inputs.x_before.to(dtype), inputs.x_after.to(dtype), inputs.cu_items, inputs.pinned, inputs.grid, seed=7
    )
    got = selectors.compute_scores(selection, selectors.get_selector(selection), inputs)
    expected = reference_score_fn(selection, inputs.cu_items, inputs.grid, inputs.pinned, seed=7)(
        inputs.x_before, inputs.x_after
    )
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    free = torch.ones(got.shape[0], dtype=torch.bool)
    free[inputs.pinned] = False
    if selection in ("random", "uniform"):
        torch.testing.assert_close(got[free], expected.to(got.dtype)[free], rtol=0, atol=0)
    else:
        assert_close(got, expected.to(got.dtype))


def test_uniform_keeps_the_coarsest_lattice_in_turn_across_parts():
    # Two 8 x 8 frames of one item: the top quarter is the stride-2 lattice of both frames, the
    # top 1/16 the stride-4 one, and within a level the frames alternate.
    grid = selectors.token_grid([(2, 8, 8)], cls=False)
    states, cu_items, no_pinned = torch.zeros(128, 4), torch.tensor([0, 128], dtype=torch.int32), torch.empty(0).long()
    inputs = selectors.SelectionInputs(states, states, cu_items, no_pinned, grid)
    scores = selectors.uniform_scores(inputs)
    order = scores.argsort(descending=True)
    lattice = grid[order[:32]]
    assert set(map(tuple, lattice[:, 1:].tolist())) == {(r, c) for r in range(0, 8, 2) for c in range(0, 8, 2)}
    assert set(map(tuple, grid[order[:8], 1:].tolist())) == {(r, c) for r in (0, 4) for c in (0, 4)}
    assert grid[order[:8], 0].tolist() == [0, 1] * 4
    assert sorted(scores.tolist()) == [-float(r) for r in range(127, -1, -1)]  # no ties
    assert coarse_to_fine_key(0, 0, 3) == 0 and coarse_to_fine_key(1, 1, 3) == 48


def test_random_scores_an_item_as_it_would_alone():
    cu = torch.tensor([0, 5, 12, 17], dtype=torch.int32)
    scores = random_scores_reference(cu, 3, torch.float32)
    alone = random_scores_reference(torch.tensor([0, 7], dtype=torch.int32), 3, torch.float32)
    assert torch.equal(scores[5:12], alone)
    assert torch.equal(scores[0:5], scores[12:17])  # the same size, the same draw
    assert not torch.equal(scores, random_scores_reference(cu, 4, torch.float32))
    assert sorted(scores[5:12].tolist()) == list(range(7))


def test_uniform_needs_a_grid():
    inputs = random_call()
    no_grid = selectors.SelectionInputs(inputs.x_before, inputs.x_after, inputs.cu_items, inputs.pinned, None)
    with pytest.raises(ValueError, match="'uniform' selector needs each item's grid"):
        selectors.uniform_scores(no_grid)
    unpinned_cls = selectors.SelectionInputs(
        inputs.x_before, inputs.x_after, inputs.cu_items, torch.empty(0, dtype=torch.int64), inputs.grid
    )
    with pytest.raises(ValueError, match="grid position of every unpinned row"):
        selectors.uniform_scores(unpinned_cls)


# -- every family kind against the float64 oracle ------------------------------------------------
@dataclass
class Case:
    """One family kind: a float64 tower, its call, items, pinned rows and the grid, written here
    independently of the adapters."""

    tower: Any
    call: Any
    items: list[int]
    pinned: set[int]
    grid: torch.Tensor
    key_padding: set[int] = frozenset()
    hints: dict | None = None  # IPCVPatch.hinted, what a model around the tower would tell it
    tiles_per_image: list[int] | None = None
    # Qwen2.5-VL applies rotary and RMSNorm in fp32 whatever its dtype: fp64 runs agree to fp32's.
    precision: torch.dtype = torch.float64


def naive_qwen_grid(grid_thw: list[list[int]], merge: int) -> list[tuple[int, int, int]]:
    cells, part = [], 0
    for t, h, w in grid_thw:
        for _ in range(t):
            for hb, wb, i, j in itertools.product(range(h // merge), range(w // merge), range(merge), range(merge)):
                cells.append((part, hb * merge + i, wb * merge + j))
            part += 1
    return cells


def naive_sequence_grid(sequences: int, side: int, cls: bool) -> list[tuple[int, int, int]]:
    cells = []
    for s in range(sequences):
        cells += [(-1, -1, -1)] * cls + [(s, r, c) for r in range(side) for c in range(side)]
    return cells


def case(kind: str) -> Case:
    if kind == "grid_windows_video":
        tower = build_tower("qwen2_5_vl", dtype=torch.float64)
        grid_thw = [[1, 8, 8], [2, 4, 8]]
        pixels, thw = sample_pixels(tower.config, grid_thw, dtype=torch.float64)
        merge = tower.spatial_merge_size
        cells = torch.tensor(naive_qwen_grid(grid_thw, merge))
        if hasattr(tower, "get_window_index"):
            window_index, _ = tower.get_window_index(thw)
        else:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

            window_index, _ = get_vision_window_index(
                thw, spatial_merge_size=merge, window_size=tower.window_size, patch_size=tower.patch_size
            )
        cells = cells.view(-1, merge * merge, 3)[window_index].reshape(-1, 3)  # the tower's window order
        return Case(tower, lambda: tower(pixels, grid_thw=thw), [64, 64], set(), cells, precision=torch.float32)
    if kind == "tiles_with_cls":
        tower = build_tower("internvl", dtype=torch.float64)
        pixels = internvl_tiles(3, dtype=torch.float64)
        cells = torch.tensor(naive_sequence_grid(3, 4, cls=True))
        return Case(tower, lambda: tower(pixels), [34, 17], {0, 17, 34}, cells, tiles_per_image=[2, 1])
    if kind == "crops_with_cls":
        tower = build_tower("clip", dtype=torch.float64)
        pixels = clip_pixels(3, dtype=torch.float64)
        cells = torch.tensor(naive_sequence_grid(3, 4, cls=True))
        hints = {"sequences_per_image": [2, 1]}  # LLaVA-NeXT: the crops of one image one item
        return Case(tower, lambda: tower(pixels), [34, 17], {0, 17, 34}, cells, hints=hints)
    assert kind == "sub_images_with_padding"
    tower = build_tower("idefics3", dtype=torch.float64)
    pixels, mask = idefics3_pixels([3], padded_columns=8, dtype=torch.float64)
    patch_mask = mask[0].unfold(1, 8, 8).unfold(2, 8, 8).sum((-1, -2)) > 0
    padding = set((~patch_mask.reshape(-1)).nonzero().squeeze(1).tolist())
    assert len(padding) == 4
    cells = torch.tensor(naive_sequence_grid(3, 4, cls=False))
    call = lambda: tower(pixels[0], patch_attention_mask=patch_mask)  # noqa: E731
    return Case(tower, call, [32, 16], padding, cells, key_padding=padding, tiles_per_image=[2, 1])


KINDS = ("grid_windows_video", "tiles_with_cls", "crops_with_cls", "sub_images_with_padding")


@contextlib.contextmanager
def patched(c: Case, config: ik.IPCVConfig):
    with ik.ipcv_applied(c.tower, config), torch.no_grad():
        patch = ik.get_ipcv_patch(c.tower)
        if c.tiles_per_image:
            ik.set_tiles_per_image(c.tower, c.tiles_per_image)
        with patch.hinted(**c.hints) if c.hints else contextlib.nullcontext():
            yield


@pytest.fixture(scope="module", params=KINDS)
def kind_case(request) -> Case:
    return case(request.param)


@pytest.fixture
def spy():
    """A registered selector recording its inputs (``"diff"``'s scores), unregistered afterwards."""
    seen: list[selectors.SelectionInputs] = []

    def record(inputs):
        seen.append(inputs)
        return selectors.diff_scores(inputs)

    selectors.register_selector("test_spy", record)
    yield seen
    del selectors._registry["test_spy"]


def test_adapter_hands_the_selector_its_grid_and_pinned_rows(kind_case, spy):
    c = kind_case
    with patched(c, ik.IPCVConfig(**CONFIG, selection="test_spy")):
        c.call()
    (inputs,) = spy
    assert torch.equal(inputs.grid.cpu(), c.grid)
    assert set(inputs.pinned.tolist()) == c.pinned
    assert inputs.cu_items.tolist() == list(itertools.accumulate([0, *c.items]))
    assert inputs.x_after.shape == inputs.x_before.shape == (sum(c.items), inputs.x_after.shape[1])


@pytest.mark.parametrize("selection", BUILT_INS)
def test_family_kind_matches_float64_oracle_with_the_reference_scores(kind_case, selection):
    c = kind_case
    cu_items = torch.tensor(list(itertools.accumulate([0, *c.items])), dtype=torch.int32)
    pinned = torch.tensor(sorted(c.pinned), dtype=torch.int64)
    score_fn = reference_score_fn(selection, cu_items, c.grid, pinned, seed=5)
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            c.tower, c.call, c.items, pinned=c.pinned, key_padding=c.key_padding, score_fn=score_fn, **CONFIG
        )
    with patched(c, ik.IPCVConfig(**CONFIG, selection=selection, selection_seed=5)):
        got = c.call()
    assert_close(got.last_hidden_state, expected.output.last_hidden_state, dtype=c.precision)


@pytest.mark.parametrize("selection", BUILT_INS)
def test_image_batch_equals_items_alone(selection):
    tower = build_tower("qwen2_5_vl")
    grid = [[1, 8, 8], [1, 4, 4], [2, 4, 8]]
    pixels, grid_thw = sample_pixels(tower.config, grid)
    with ik.ipcv_applied(tower, ik.IPCVConfig(**CONFIG, selection=selection)), torch.no_grad():
        batched = tower(pixels, grid_thw=grid_thw).pooler_output
        rows = pixels.split(grid_thw.prod(-1).tolist())
        alone = [tower(r, grid_thw=g[None]).pooler_output for r, g in zip(rows, grid_thw, strict=True)]
    assert_close(batched, torch.cat(alone))


@pytest.mark.parametrize("selection", BUILT_INS)
def test_tiled_batch_equals_images_alone(selection):
    tower = build_tower("internvl")
    tiles = internvl_tiles(5)
    with ik.ipcv_applied(tower, ik.IPCVConfig(**CONFIG, selection=selection)), torch.no_grad():
        ik.set_tiles_per_image(tower, [2, 3])
        batched = tower(tiles).last_hidden_state
        ik.set_tiles_per_image(tower, [2])
        first = tower(tiles[:2]).last_hidden_state
        ik.set_tiles_per_image(tower, [3])
        second = tower(tiles[2:]).last_hidden_state
    assert_close(batched, torch.cat([first, second]))


# -- the registry and bad selectors --------------------------------------------------------------
def test_registry_names_and_errors():
    assert set(BUILT_INS) <= set(ik.available_selectors())
    with pytest.raises(ValueError, match="built-in selector"):
        ik.register_selector("diff", selectors.norm_scores)
    with pytest.raises(TypeError, match="fn must be callable"):
        ik.register_selector("x", 3)
    with pytest.raises(ValueError, match="non-empty"):
        ik.register_selector("", selectors.norm_scores)
    ik.register_selector("test_twice", selectors.norm_scores)
    try:
        ik.register_selector("test_twice", selectors.norm_scores)  # the same function: fine
        with pytest.raises(ValueError, match="already registered"):
            ik.register_selector("test_twice", selectors.diff_scores)
        ik.register_selector("test_twice", selectors.diff_scores, replace=True)
        assert selectors.get_selector("test_twice") is selectors.diff_scores
    finally:
        del selectors._registry["test_twice"]
    with pytest.raises(ValueError, match=r"selection must be one of .*diff.*got 'no_such'"):
        ik.apply_ipcv(build_tower("siglip"), ik.IPCVConfig(selection="no_such"))
    with pytest.raises(TypeError, match="selection must be a non-empty str"):
        ik.IPCVConfig(selection=None)
    with pytest.raises(ValueError, match="selection_seed"):
        ik.IPCVConfig(selection_seed=-1)


BAD = {
    "wrong_shape": (lambda inputs: selectors.diff_scores(inputs)[:-1], ValueError, "must return scores of shape"),
    "nan": (lambda inputs: selectors.diff_scores(inputs) * float("nan"), ValueError, "returned NaN scores"),
    "wrong_dtype": (lambda inputs: selectors.diff_scores(inputs).half(), TypeError, "must return torch.float32"),
    "not_a_tensor": (lambda inputs: [0.0], TypeError, "must return a torch.Tensor"),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_selector_is_refused_by_name_and_the_next_forward_is_correct(bad):
    fn, error, message = bad
    tower = build_tower("clip")
    pixels = clip_pixels(2)
    good = ik.IPCVConfig(**CONFIG, selection="norm")
    with ik.ipcv_applied(tower, good), torch.no_grad():
        expected = tower(pixels).last_hidden_state
    calls = itertools.count()

    def bad_once(inputs):  # bad on the first forward, "norm" on the next
        return fn(inputs) if next(calls) == 0 else selectors.norm_scores(inputs)

    selectors.register_selector("test_bad", bad_once)
    try:
        with ik.ipcv_applied(tower, ik.IPCVConfig(**CONFIG, selection="test_bad")), torch.no_grad():
            with pytest.raises(error, match=f"selector 'test_bad' {message}"):
                tower(pixels)
            assert ik.get_ipcv_patch(tower).state is None  # the failed forward left nothing bound
            assert_close(tower(pixels).last_hidden_state, expected)
    finally:
        del selectors._registry["test_bad"]


# -- torch.compile -------------------------------------------------------------------------------
def test_ops_compile_with_a_custom_selector():
    """A custom selector's scores and the planning ops (``plan_from_scores``: ``select_tokens``,
    ``knn``, ``shrink_cu_seqlens``) trace into one graph and equal eager mode."""

    def cosine_change(inputs: selectors.SelectionInputs) -> torch.Tensor:
        return 1 - torch.nn.functional.cosine_similarity(inputs.x_before, inputs.x_after, dim=-1)

    def plan(x_before, x_after, cu_items, cu_seqlens):
        pinned = torch.empty(0, dtype=torch.int64)
        scores = cosine_change(selectors.SelectionInputs(x_before, x_after, cu_items, pinned, None))
        return selectors.plan_from_scores(scores, x_after, cu_items, cu_seqlens, 0.5, 2)

    generator = torch.Generator().manual_seed(0)
    x_before, x_after = torch.randn(2, 12, 8, generator=generator)
    cu_items = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_seqlens = torch.tensor([0, 3, 5, 12], dtype=torch.int32)
    compiled = torch.compile(plan, backend="aot_eager", fullgraph=True, dynamic=False)
    for got, expected in zip(
        compiled(x_before, x_after, cu_items, cu_seqlens), plan(x_before, x_after, cu_items, cu_seqlens), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_selection_is_a_plain_setting_of_every_front_end():
    from ipcv_kernels.eval import build_settings

    config, _ = build_settings(ipcv_selection="uniform", ipcv_selection_seed="3")  # lmms-eval model args
    assert (config.selection, config.selection_seed) == ("uniform", 3)
    assert ik.IPCVConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config  # hf_overrides-style
