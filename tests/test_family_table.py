"""Every row of the family table through everything it claims, so that a new row is tested by
being added: its structure; its tiny full model at ratio 0 (equal to the unpatched model, exactly but for
round-off where padding is masked), with a
pruning setting (generate runs, remove is exact); its tiny tower against the independent float64
spec oracle, as a batch equal to its items alone and from two threads at once equal to serial
calls, all called as its call kind calls it; the bench on it with its checks. The fidelity tool (``fidelity/test_fidelity``: every preset, one per
row with a tiny tower), the lmms-eval plugin (``models/test_lmms_eval_adapter``: every row with a
tiny model) and vLLM (``vllm/test_vllm_families``: every row with a vLLM entry) iterate the same
table.
"""

from __future__ import annotations

import pytest
import torch
from oracles.rows import row_params
from oracles.serial import hammer
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels.bench import progress
from ipcv_kernels.bench.calls import Case, GridCalls, PatchCalls, SliceCalls, SubImageCalls, TowerCalls, tower_calls
from ipcv_kernels.bench.variants import VARIANTS, variant_configs
from ipcv_kernels.bench.vit import Bench, run_case
from ipcv_kernels.families import CALL_KINDS, FAMILIES, build_model, build_tower, find_family, find_vllm_family, presets
from ipcv_kernels.families.row import PATCHES, SUB_IMAGES
from ipcv_kernels.testing import assert_close

ROWS = {row.id: row for row in FAMILIES}
WITH_MODEL = row_params(row.id for row in FAMILIES if row.tiny_model is not None)
WITH_TOWER = row_params(row.id for row in FAMILIES if row.tiny_tower is not None)
RATIO_ZERO = ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4)
PRUNING = ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
ORACLE = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=3)
# Some towers apply rotary and RMSNorm in fp32 whatever their dtype (Qwen2.5-VL), where IPCV's
# stabilisation blocks apply rotary in the input dtype: float64 runs agree to fp32 precision.
ORACLE_PRECISION = torch.float32


def skip_where_unavailable(family_id: str) -> None:
    """Skip a tiny-tower test of a row whose tower needs a newer transformers (``Family.min_transformers``)."""
    reason = ROWS[family_id].tower_test_skip()
    if reason is not None:
        pytest.skip(reason)


def two_images(calls: TowerCalls) -> tuple[str, str]:
    """Two single-image cases of different sizes for ``calls``' tower (in pixels)."""
    if isinstance(calls, GridCalls):
        unit = calls.merge_unit
        return f"{2 * unit}x{2 * unit}", f"{2 * unit}x{3 * unit}"
    if isinstance(calls, PatchCalls):  # two aspect ratios, each padded to the patch budget
        unit = calls.patch * calls.pool
        return f"{4 * unit}x{6 * unit}", f"{5 * unit}x{3 * unit}"
    side = calls.image_size[0]
    if isinstance(calls, SubImageCalls):  # two sub-images and the global one, the second padded
        return f"{side}x{side}", f"{side}x{2 * side - calls.patch_size[0]}"
    return f"{side}x{side}", f"{side}x{2 * side}"


def joined(cases: list[Case]) -> Case:
    """One call of the images of ``cases`` in order."""
    return Case(
        "+".join(case.name for case in cases),
        "batch",
        sum((case.grid_thw for case in cases), ()),
        sum((case.tiles_per_image for case in cases), ()),
        cases[0].tile_tokens,
        sum((case.tile_real for case in cases), ()),
        cases[0].frame_cls,
    )


def split_inputs(calls: TowerCalls, batch: tuple[Case, tuple], cases: list[Case]) -> list[tuple[Case, tuple]]:
    """The inputs of each image of ``batch``, cut out of it."""
    _, tensors = batch
    if isinstance(calls, GridCalls):
        pixels, grid = tensors
        sizes = [case.patches for case in cases]
        return [
            (case, (part, grid[i : i + 1]))
            for i, (case, part) in enumerate(zip(cases, pixels.split(sizes), strict=True))
        ]
    sizes = [sum(case.tiles_per_image) for case in cases]
    parts = [tensor.split(sizes) for tensor in tensors]
    return [(case, tuple(part[i] for part in parts)) for i, case in enumerate(cases)]


def oracle_layout(calls: TowerCalls, case: Case, inputs: tuple) -> tuple[list[int], set[int], set[int]]:
    """``(items, pinned rows, key-padding rows)`` of a call, in the rows its blocks see."""
    if isinstance(calls, SliceCalls):  # the blocks from P on see each slice 2 x 2 merged
        return [t * h * w // 4 for t, h, w in case.grid_thw], set(), set()
    if isinstance(calls, GridCalls):
        # A CLS row before every frame where the tower prepends one (pinned).
        frames = [h * w + case.frame_cls for t, h, w in case.grid_thw for _ in range(t)]
        starts = [sum(frames[:i]) for i in range(len(frames))]
        return (
            [t * (h * w + case.frame_cls) for t, h, w in case.grid_thw],
            set(starts) if case.frame_cls else set(),
            set(),
        )
    items = [tiles * case.tile_tokens for tiles in case.tiles_per_image]
    if isinstance(calls, PatchCalls):  # padding rows: position -1
        padding = (inputs[1] == -1).all(-1).flatten().nonzero().flatten().tolist()
        return items, set(padding), set(padding)
    if isinstance(calls, SubImageCalls):
        padding = (~inputs[1].flatten(1)).flatten().nonzero().flatten().tolist()
        return items, set(padding), set(padding)
    first = case.tile_tokens - 1 if calls.cls_last else 0  # Llama 4 appends its CLS token last
    pinned = set(range(first, sum(items), case.tile_tokens)) if calls.cls else set()
    return items, pinned, set()


# -- structure ---------------------------------------------------------------------------------------
def test_ids_are_unique_and_every_row_says_where_it_runs():
    assert len(ROWS) == len(FAMILIES)
    for row in FAMILIES:
        assert row.kind in CALL_KINDS and callable(row.flops), row.id
        assert row.hf is not None or row.vllm is not None, row.id
        assert ik.IPCVConfig(**row.recommended) and row.recommended_source, row.id
        if row.hf is not None and row.hf.language_models:
            assert row.tiny_model is not None, f"{row.id}: a full model needs a tiny model for its tests"


@pytest.mark.parametrize("family_id", WITH_TOWER)
def test_tiny_tower_is_found_as_its_row(family_id):
    tower = build_tower(family_id)
    assert find_family(tower) == (ROWS[family_id], tower)


@pytest.mark.parametrize("name", sorted(presets()))
def test_presets_name_a_row_with_a_tower(name):
    row, preset = presets()[name]
    tower_row = ROWS[preset.tower or row.id]
    assert tower_row.tiny_tower is not None and (preset.use is None or preset.use.family in ROWS)


def test_vllm_entries_name_their_adapter_and_tower():
    for row in FAMILIES:
        if row.vllm is not None:
            assert row.vllm.adapter_class().__name__ == row.vllm.adapter.rpartition(":")[2]
            assert set(row.vllm.towers) and set(row.vllm.architectures)
    with pytest.raises(TypeError, match="vLLM model"):
        find_vllm_family(torch.nn.Linear(1, 1))


# -- the tiny full model ----------------------------------------------------------------------------
@pytest.mark.parametrize("family_id", WITH_MODEL)
def test_tiny_model_ratio_zero_equals_unpatched_pruning_generates_remove_exact(family_id):
    model = build_model(family_id)
    row = ROWS[family_id]
    assert find_family(model)[0] is row
    inputs = row.tiny_model.prompt(model, 2, 0)
    with torch.no_grad():
        expected = model(**inputs).logits
        with ik.ipcv_applied(model, RATIO_ZERO):
            got = model(**inputs).logits
        if row.kind in (SUB_IMAGES, PATCHES):
            # Padding patches: the model's masked attention and IPCV's attention over the real keys
            # only add the same terms in another order (fp32 round-off).
            assert_close(got, expected)
        else:
            assert torch.equal(got, expected)
        ik.apply_ipcv(model, PRUNING)
        assert not torch.allclose(model(**inputs).logits, expected)  # the image features reach the logits
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        ik.remove_ipcv(model)
        assert torch.equal(model(**inputs).logits, expected)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize(
    "family_id", row_params(row.id for row in FAMILIES if row.hf is not None and row.hf.llm_refusal)
)
def test_llm_pruners_are_refused_where_the_row_says(family_id):
    model = build_model(family_id)
    inputs = ROWS[family_id].tiny_model.prompt(model, 1, 0)
    with torch.no_grad():
        expected = model(**inputs).logits
        for pruner in (ik.FastV(layer=1, ratio=0.5), ik.DART(layer=1, ratio=0.5)):
            with pytest.raises(TypeError, match="llm_pruner"):
                ik.apply_ipcv(model, PRUNING, llm_pruner=pruner)
            assert ik.get_ipcv_patch(model) is None  # refused before anything was patched
        assert torch.equal(model(**inputs).logits, expected)


# -- the tiny tower, called as its call kind calls it ----------------------------------------------
@pytest.mark.parametrize("family_id", WITH_TOWER)
def test_tiny_tower_matches_float64_spec_oracle(family_id):
    skip_where_unavailable(family_id)
    tower = build_tower(family_id, dtype=torch.float64)
    calls = tower_calls(tower)
    case = joined([calls.parse_case(text) for text in two_images(calls)])
    inputs = calls.inputs(case, 0, torch.device("cpu"), torch.float64)
    items, pinned, key_padding = oracle_layout(calls, case, inputs[1])
    with torch.no_grad():
        expected = ipcv_tower_oracle(
            tower, lambda: calls.forward(inputs), items, pinned=pinned, key_padding=key_padding, **ORACLE
        )
        with ik.ipcv_applied(tower, ik.IPCVConfig(**ORACLE)):
            got = calls.forward(inputs)
    assert_close(got, expected.output, dtype=ORACLE_PRECISION)


@pytest.mark.parametrize("family_id", WITH_TOWER)
def test_tiny_tower_batch_equals_its_images_alone(family_id):
    skip_where_unavailable(family_id)
    tower = build_tower(family_id)
    calls = tower_calls(tower)
    cases = [calls.parse_case(text) for text in two_images(calls)]
    batch = calls.inputs(joined(cases), 0, torch.device("cpu"), torch.float32)
    with torch.no_grad(), ik.ipcv_applied(tower, PRUNING):
        together = calls.forward(batch)
        alone = torch.cat([calls.forward(inputs) for inputs in split_inputs(calls, batch, cases)])
    assert_close(together, alone)


@pytest.mark.parametrize("family_id", WITH_TOWER)
def test_tiny_tower_concurrent_calls_equal_serial_calls(family_id):
    """Two threads calling one patched tower at once, with images of different sizes, get exactly
    what the same calls give one after the other (a patched model is as re-entrant as the
    unpatched one)."""
    tower = build_tower(family_id)
    calls = tower_calls(tower)
    cpu = torch.device("cpu")
    inputs = [
        calls.inputs(calls.parse_case(text), seed, cpu, torch.float32) for seed, text in enumerate(two_images(calls))
    ]
    with ik.ipcv_applied(tower, PRUNING):
        hammer([lambda one=one: calls.forward(one) for one in inputs], rounds=3)


# -- the tools on every row -------------------------------------------------------------------------
@pytest.mark.parametrize("family_id", WITH_TOWER)
def test_bench_runs_the_tiny_tower_with_its_checks(family_id):
    tower = build_tower(family_id)
    calls = tower_calls(tower)
    bench = Bench(tower, calls, torch.device("cpu"), torch.float32, variant_configs(PRUNING, VARIANTS))
    case = calls.parse_case(two_images(calls)[1])
    with progress.Progress(0, "test", enabled=False) as bar:
        result = run_case(bench, case, VARIANTS, warmup=0, repeats=1, check_ratio_zero=True, seed=0, bar=bar)
    assert result["checks"]["passed"], result["checks"]
    assert result["ipcv_tokens_per_block"][-1] == result["kept_tokens"] < result["tokens"]
