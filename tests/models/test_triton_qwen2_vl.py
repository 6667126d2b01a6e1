"""Qwen2-VL with IPCV on the Triton path equals the reference path: a tiny random tower, planning,
NGR and the kept-query attention (with its rotary pass) through the Triton kernels (the interpreter
on CPU, or CUDA; ``backend="auto"``, which the ``triton_backends`` fixture ranks them first for,
and the device's planning backend, since planning has no Triton backend of its own), against the
reference path: both judged against the fp64 tower."""

from __future__ import annotations

import copy

import pytest
import torch

import ipcv_kernels as ik
from ipcv_kernels.testing import assert_close_to_reference
from ipcv_kernels.testing.models import build_qwen2_vl_tower, sample_pixels

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


REFERENCE = ik.IPCVConfig(**CONFIG, ops_backend="torch", attention_backend="torch")


def check_against_fp64_tower(tower, config: ik.IPCVConfig, dtype: torch.dtype) -> None:
    """``config``'s output vs the same tower in fp64 (exact copies of its weights), within a small
    multiple of PyTorch's own error in ``dtype`` (the reference path run in ``dtype``)."""
    got = tower_output(tower, config, dtype)
    assert got.shape == (sum(t * h * w for t, h, w in GRID), tower.config.embed_dim)
    expected = tower_output(copy.deepcopy(tower).double(), REFERENCE, torch.float64)
    assert_close_to_reference(got, expected, tower_output(tower, REFERENCE, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_path_equals_reference_path(triton_backends, monkeypatch, dtype):
    from ipcv_kernels.triton import ngr_attention, ngr_reconstruct

    launches = {}
    for module, name in (
        (ngr_attention, "varlen_attention_kernel"),
        (ngr_attention, "rotary_kernel"),
        (ngr_reconstruct, "ngr_reconstruct_kernel"),
    ):
        launches[name] = CountingLauncher(getattr(module, name))
        monkeypatch.setattr(module, name, launches[name])
    tower = build_qwen2_vl_tower(dtype=dtype, device=triton_backends)
    check_against_fp64_tower(tower, ik.IPCVConfig(**CONFIG, ops_backend="auto", attention_backend="triton"), dtype)
    # Per stabilisation block: one attention launch after one rotary pass over the kept queries
    # and one over the keys.
    assert launches["varlen_attention_kernel"].launches == CONFIG["as_layers"]
    assert launches["rotary_kernel"].launches == 2 * CONFIG["as_layers"]
    # The full sequence is rebuilt in place by the fused restore (one launch for the kept rows, one
    # for the reconstructed rows): once per stabilisation block, and once more after the last block.
    assert launches["ngr_reconstruct_kernel"].launches == 2 * (CONFIG["as_layers"] + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_auto_equals_reference_path(cuda_device, dtype):
    # ``auto`` on CUDA: Triton planning, NGR and fused attention.
    check_against_fp64_tower(build_qwen2_vl_tower(dtype=dtype, device=cuda_device), ik.IPCVConfig(**CONFIG), dtype)
