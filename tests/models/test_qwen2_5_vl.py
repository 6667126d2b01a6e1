"""IPCV on a stock Hugging Face Qwen2.5-VL (window attention, RMSNorm, gated MLP): the unpatched
model at ratio 0, the float64 spec oracle otherwise (windows shrunk or emptied per segment), the
model's output order, batches equal to items alone, removal, and full-model generate."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import check_generate_and_ratio_zero
from oracles.towers import build_model, build_tower, ipcv_tower_oracle, tower_call

import ipcv_kernels as ik
from ipcv_kernels.testing import assert_close, assert_close_to_reference
from ipcv_kernels.testing.models import sample_pixels, vision_inputs

FAMILY = "qwen2_5_vl"
# The model applies rotary and RMSNorm in fp32 whatever its dtype, and IPCV's stabilisation blocks
# apply rotary in the input dtype: float64 runs agree to fp32 precision.
MODEL_PRECISION = torch.float32
INPUTS = {
    "one_image": [[1, 8, 12]],
    "image_batch": [[1, 8, 12], [1, 6, 4], [1, 2, 2]],
    "video": [[2, 8, 8]],
    "mix": [[1, 8, 8], [2, 4, 8]],
}
ORACLE_INPUTS = ("one_image", "image_batch", "video")  # "mix": see the scope test
CONFIGS = {
    "P1_r50_A0_k1": dict(prune_layer=1, ratio=0.5, as_layers=0, num_neighbors=1),
    "P2_r65_A2_k10": dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=10),
    "P3_r90_A1_k3": dict(prune_layer=3, ratio=0.9, as_layers=1, num_neighbors=3),  # empties windows
    "P1_r30_to_end_k4": dict(prune_layer=1, ratio=0.3, as_layers=99, num_neighbors=4),
}


@pytest.fixture(scope="module")
def tower64():
    return build_tower(FAMILY, dtype=torch.float64)


def split_items(pixels, grid_thw):
    return zip(pixels.split(grid_thw.prod(-1).tolist()), grid_thw, strict=True)


def run(tower, grid, config=None):
    with ik.ipcv_applied(tower, config) if config else contextlib.nullcontext(), torch.no_grad():
        return tower_call(tower, grid)()


def oracle(tower, grid, config, *, scope="image"):
    lengths = [t * h * w for t, h, w in grid]
    items = lengths if scope == "image" else [sum(lengths)]
    with torch.no_grad():
        return ipcv_tower_oracle(tower, tower_call(tower, grid), items, **config)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("grid", INPUTS.values(), ids=INPUTS.keys())
def test_ratio_zero_equals_unpatched(attn, grid):
    tower = build_tower(FAMILY, attn=attn)
    expected = run(tower, grid)
    got = run(tower, grid, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2, num_neighbors=4))
    assert type(got) is type(expected)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooler_output, expected.pooler_output)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("grid", [INPUTS[k] for k in ORACLE_INPUTS], ids=ORACLE_INPUTS)
def test_matches_float64_spec_oracle(tower64, config, grid):
    got = run(tower64, grid, ik.IPCVConfig(**config))
    expected = oracle(tower64, grid, config)
    assert_close(got.last_hidden_state, expected.full[-1], dtype=MODEL_PRECISION)
    assert_close(got.pooler_output, expected.output.pooler_output, dtype=MODEL_PRECISION)  # usual order


@pytest.mark.parametrize("as_queries", ["kept", "all"])
@pytest.mark.parametrize("scope", ["image", "global"])
def test_scopes_and_paper_formulation_match_oracle(tower64, scope, as_queries):
    config = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=5)
    got = run(tower64, INPUTS["mix"], ik.IPCVConfig(**config, scope=scope, as_queries=as_queries))
    expected = oracle(tower64, INPUTS["mix"], config, scope=scope)
    assert_close(got.pooler_output, expected.output.pooler_output, dtype=MODEL_PRECISION)


def test_windows_shrink_and_empty(tower64):
    # 96 tokens in 6 windows of 16: keeping 9 leaves some windows empty in the pruned blocks.
    config = ik.IPCVConfig(prune_layer=3, ratio=0.9, as_layers=0, num_neighbors=2)
    ik.apply_ipcv(tower64, config)
    seen = []
    hook = tower64.blocks[4].attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cu_seqlens"].clone()), with_kwargs=True
    )
    with torch.no_grad():
        tower_call(tower64, INPUTS["one_image"])()
    hook.remove()
    ik.remove_ipcv(tower64)
    (cu,) = seen
    assert int(cu[-1]) == 9
    assert ik.get_ipcv_patch(tower64) is None


def test_image_batch_equals_items_alone(tower64):
    grid = INPUTS["image_batch"] + INPUTS["video"]
    pixels, grid_thw = sample_pixels(tower64.config, grid, dtype=torch.float64)
    ik.apply_ipcv(tower64, ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=1, num_neighbors=3))
    with torch.no_grad():
        batched = tower64(pixels, grid_thw=grid_thw).pooler_output
        alone = [tower64(rows, grid_thw=g[None]).pooler_output for rows, g in split_items(pixels, grid_thw)]
    ik.remove_ipcv(tower64)
    assert_close(batched, torch.cat(alone))


def test_remove_restores_the_original_forward_exactly():
    tower = build_tower(FAMILY)
    originals = [block.forward for block in tower.blocks]
    expected = run(tower, INPUTS["mix"])
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=1, ratio=0.8, as_layers=1, num_neighbors=2))
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=0, num_neighbors=2))
    ik.remove_ipcv(tower)
    assert [block.forward for block in tower.blocks] == originals
    assert not tower._forward_hooks and not tower._forward_pre_hooks
    assert torch.equal(run(tower, INPUTS["mix"]).pooler_output, expected.pooler_output)


@pytest.mark.parametrize("video", [False, True], ids=["images", "video"])
def test_full_model_generate_and_ratio_zero_logits(video):
    model = build_model(FAMILY)
    inputs = vision_inputs(model, [[2, 4, 8]] if video else [[1, 4, 4], [1, 8, 4]], video=video)
    check_generate_and_ratio_zero(model, inputs, [64, 64, 22, 22, 22, 22] if video else [48, 48, 5 + 11, 16, 16, 16])


def test_benchmark_flop_model_uses_the_towers_windows(tower64):
    from ipcv_kernels.flops import predicted_speedup, qwen2_5_vl_flops, qwen2_5_window_lengths

    config = tower64.config
    window = config.window_size // config.spatial_merge_size // config.patch_size
    seen = []
    hook = tower64.blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cu_seqlens"]), with_kwargs=True
    )
    for grid in [*INPUTS["image_batch"], *INPUTS["video"]]:
        with torch.no_grad():
            tower_call(tower64, [grid])()
        assert seen[-1].diff().tolist() == qwen2_5_window_lengths(*grid, config.spatial_merge_size, window)
    hook.remove()
    grid = INPUTS["mix"]
    unpatched = qwen2_5_vl_flops(config, grid, None)
    same = qwen2_5_vl_flops(config, grid, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=2))
    assert predicted_speedup(unpatched, same, include_overhead=False) == 1.0
    kinds = [b.kind for b in qwen2_5_vl_flops(config, grid, ik.IPCVConfig(prune_layer=2, as_layers=2)).blocks]
    assert kinds == ["full", "full", "stabilised", "stabilised", "pruned", "pruned"]


def test_triton_path_equals_reference_path(triton_backends):
    # Windows emptied in the stabilisation blocks' queries and in the pruned blocks (ratio 0.9).
    tower = build_tower(FAMILY).to(triton_backends)
    pixels, grid_thw = sample_pixels(tower.config, [[1, 8, 8], [1, 2, 2]])
    outputs = []
    for backend in ("auto", "torch"):  # auto: the Triton kernels, ranked first by the fixture
        ik.apply_ipcv(
            tower,
            ik.IPCVConfig(
                prune_layer=2, ratio=0.9, as_layers=2, num_neighbors=3, ops_backend=backend, attention_backend=backend
            ),
        )
        with torch.no_grad():
            outputs.append(tower(pixels.to(triton_backends), grid_thw=grid_thw.to(triton_backends)).pooler_output)
        ik.remove_ipcv(tower)
    assert_close(*outputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_auto_is_as_close_to_fp64_as_pytorch(cuda_device, dtype):
    # auto (Triton planning, NGR, rotary and kept-query attention) vs the fp64 tower, relative to the error
    # of the reference path run in the same dtype.
    tower = build_tower(FAMILY, dtype=dtype).to(cuda_device)
    pixels, grid_thw = sample_pixels(tower.config, INPUTS["image_batch"] + INPUTS["video"])
    settings = dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=3)

    def output(model, backend):
        ik.apply_ipcv(model, ik.IPCVConfig(**settings, ops_backend=backend, attention_backend=backend))
        with torch.no_grad():
            out = model(pixels.to(cuda_device, model.dtype), grid_thw=grid_thw.to(cuda_device)).pooler_output
        ik.remove_ipcv(model)
        return out

    expected = output(copy.deepcopy(tower).double(), "torch")
    assert_close_to_reference(output(tower, "auto"), expected, output(tower, "torch"))
