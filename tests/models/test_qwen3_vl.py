"""IPCV on a stock Hugging Face Qwen3-VL: the unpatched model at ratio 0 (DeepStack features too),
the float64 spec oracle otherwise, DeepStack taps restored to full length from the pruned stretch,
removal, and full-model generate."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import pytest
import torch
from conftest import check_generate_and_ratio_zero
from oracles.towers import build_model, build_tower, ipcv_tower_oracle, tower_call

import ipcv_kernels as ik
from ipcv_kernels.testing import assert_close, assert_close_to_reference
from ipcv_kernels.testing.models import sample_pixels, vision_inputs

FAMILY = "qwen3_vl"
# The model applies rotary in fp32 whatever its dtype, and IPCV's stabilisation blocks apply it in
# the input dtype: float64 runs agree to fp32 precision.
MODEL_PRECISION = torch.float32
INPUTS = {
    "one_image": [[1, 8, 12]],
    "image_batch": [[1, 8, 12], [1, 6, 4], [1, 2, 2]],
    "video": [[2, 8, 8]],
}
# Taps after blocks 1, 3 and 4: before P, inside the stabilisation stretch, and in the pruned one.
CONFIGS = {
    "P2_r65_A2_k10": dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=10),
    "P1_r75_A0_k3": dict(prune_layer=1, ratio=0.75, as_layers=0, num_neighbors=3),
    "P3_r50_A1_k1": dict(prune_layer=3, ratio=0.5, as_layers=1, num_neighbors=1),
}


@pytest.fixture(scope="module")
def tower64():
    return build_tower(FAMILY, dtype=torch.float64)


def run(tower, grid, config=None):
    with ik.ipcv_applied(tower, config) if config else contextlib.nullcontext(), torch.no_grad():
        return tower_call(tower, grid)()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("grid", INPUTS.values(), ids=INPUTS.keys())
def test_ratio_zero_equals_unpatched(attn, grid):
    tower = build_tower(FAMILY, attn=attn)
    expected = run(tower, grid)
    got = run(tower, grid, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=1, num_neighbors=4))
    assert type(got) is type(expected)
    assert_close(got.pooler_output, expected.pooler_output)
    assert len(got.deepstack_features) == len(expected.deepstack_features) == 3
    for tap, expected_tap in zip(got.deepstack_features, expected.deepstack_features, strict=True):
        assert_close(tap, expected_tap)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("grid", INPUTS.values(), ids=INPUTS.keys())
def test_matches_float64_spec_oracle(tower64, config, grid):
    got = run(tower64, grid, ik.IPCVConfig(**config))
    with torch.no_grad():
        expected = ipcv_tower_oracle(tower64, tower_call(tower64, grid), [t * h * w for t, h, w in grid], **config)
    assert_close(got.last_hidden_state, expected.full[-1], dtype=MODEL_PRECISION)
    assert_close(got.pooler_output, expected.output.pooler_output, dtype=MODEL_PRECISION)
    for tap, expected_tap in zip(got.deepstack_features, expected.output.deepstack_features, strict=True):
        assert tap.shape == expected_tap.shape  # every tap sees the full token count
        assert_close(tap, expected_tap, dtype=MODEL_PRECISION)


def test_remove_restores_the_original_forward_exactly():
    tower = build_tower(FAMILY)
    originals = [block.forward for block in tower.blocks]
    expected = run(tower, INPUTS["image_batch"])
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=1, ratio=0.8, as_layers=1, num_neighbors=2))
    ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=0, num_neighbors=2))
    ik.remove_ipcv(tower)
    assert [block.forward for block in tower.blocks] == originals
    assert not tower._forward_hooks and not tower._forward_pre_hooks
    assert not any(merger._forward_pre_hooks for merger in tower.deepstack_merger_list)
    got = run(tower, INPUTS["image_batch"])
    assert torch.equal(got.pooler_output, expected.pooler_output)
    for tap, expected_tap in zip(got.deepstack_features, expected.deepstack_features, strict=True):
        assert torch.equal(tap, expected_tap)


@pytest.mark.parametrize("video", [False, True], ids=["images", "video"])
def test_full_model_generate_and_ratio_zero_logits(video):
    model = build_model(FAMILY)
    inputs = vision_inputs(model, [[1, 4, 8], [1, 4, 8]] if video else [[1, 4, 4], [1, 8, 4]], video=video)
    if video:  # one 2-frame video; Qwen3-VL's prompt places each frame in its own vision span
        inputs["video_grid_thw"] = torch.tensor([[2, 4, 8]])
    check_generate_and_ratio_zero(model, inputs, [64, 64, 22, 22, 22, 22] if video else [48, 48, 5 + 11, 16, 16, 16])


def backend_outputs(tower, grid, device, dtype, backends):
    pixels, grid_thw = sample_pixels(tower.config, grid, dtype=dtype)
    outputs = []
    for backend in backends:
        config = ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=1, num_neighbors=3, ops_backend=backend)
        ik.apply_ipcv(tower, replace(config, attention_backend=backend))
        with torch.no_grad():
            out = tower(pixels.to(device), grid_thw=grid_thw.to(device))
        ik.remove_ipcv(tower)
        outputs.append([out.pooler_output, *out.deepstack_features])
    return outputs


def test_triton_path_equals_reference_path(triton_backends):
    tower = build_tower(FAMILY).to(triton_backends)
    triton, reference = backend_outputs(
        tower, [[1, 8, 12], [2, 4, 4]], triton_backends, torch.float32, ("auto", "torch")
    )
    for got, expected in zip(triton, reference, strict=True):
        assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_auto_is_as_close_to_fp64_as_pytorch(cuda_device, dtype):
    # auto vs the fp64 tower (merger and every DeepStack tap), relative to the reference path's
    # error in the same dtype.
    tower = build_tower(FAMILY, dtype=dtype).to(cuda_device)
    grid = INPUTS["image_batch"] + INPUTS["video"]
    (auto,) = backend_outputs(tower, grid, cuda_device, dtype, ("auto",))
    (same_dtype,) = backend_outputs(tower, grid, cuda_device, dtype, ("torch",))
    (expected,) = backend_outputs(copy.deepcopy(tower).double(), grid, cuda_device, torch.float64, ("torch",))
    for got, reference64, torch_same_dtype in zip(auto, expected, same_dtype, strict=True):
        assert_close_to_reference(got, reference64, torch_same_dtype)
