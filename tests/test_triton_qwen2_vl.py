"""Qwen2-VL with IPCV on the Triton path equals the reference path: a tiny random tower, planning,
NGR and the fused attention (rotary + kept queries) all through ``backend="triton"`` (the
interpreter on CPU, or CUDA), against ``backend="torch"``."""

from __future__ import annotations

import copy

import pytest
import torch

import ipcv_kernels as ik
from ipcv_kernels.hf_factory import build_qwen2_vl_tower, sample_pixels
from ipcv_kernels.testing import assert_close, assert_close_to_reference

GRID = [[1, 4, 6], [2, 4, 4], [1, 2, 2]]  # two images and a two-frame video: items and frames differ
CONFIG = dict(prune_layer=2, ratio=0.65, as_layers=2, num_neighbors=4)


def tower_output(tower, config: ik.IPCVConfig, dtype: torch.dtype) -> torch.Tensor:
    pixels, grid_thw = sample_pixels(tower.config, GRID, dtype=dtype)
    ik.apply_ipcv(tower, config)
    try:
        with torch.no_grad():
            return tower(pixels.to(tower.device), grid_thw=grid_thw.to(tower.device)).last_hidden_state
    finally:
        ik.remove_ipcv(tower)


class CountingLauncher:
    """Stands in for a ``@triton.jit`` kernel object: counts launches, then launches the real one."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_triton_path_equals_reference_path(triton_backends, monkeypatch):
    from ipcv_kernels.ops import triton_backend

    attention = CountingLauncher(triton_backend.varlen_attention_kernel)
    monkeypatch.setattr(triton_backend, "varlen_attention_kernel", attention)
    tower = build_qwen2_vl_tower(device=triton_backends)
    triton = tower_output(tower, ik.IPCVConfig(**CONFIG, backend="triton", attention_backend="triton"), torch.float32)
    assert attention.launches == CONFIG["as_layers"]  # one fused launch per stabilisation block
    reference = tower_output(tower, ik.IPCVConfig(**CONFIG, backend="torch", attention_backend="torch"), torch.float32)
    assert_close(triton, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_auto_equals_reference_path(cuda_device, dtype):
    # ``auto`` on CUDA: Triton planning, NGR and fused attention; judged against the same tower in
    # fp64 (exact copies of the half-precision weights), relative to PyTorch's own half error.
    tower = build_qwen2_vl_tower(dtype=dtype, device=cuda_device)
    tower64 = copy.deepcopy(tower).double()
    reference = ik.IPCVConfig(**CONFIG, backend="torch", attention_backend="torch")
    auto = tower_output(tower, ik.IPCVConfig(**CONFIG), dtype)
    assert auto.shape == (sum(t * h * w for t, h, w in GRID), tower.config.embed_dim)
    assert_close_to_reference(
        auto, tower_output(tower64, reference, torch.float64), tower_output(tower, reference, dtype)
    )
