"""Shared fixtures. Nothing here touches a device at import or collection time."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device, or a clean skip (evaluated when the test runs, not at collection)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def offsets(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 ``cu_seqlens`` for segment ``lengths``."""
    return torch.tensor([0, *lengths], dtype=torch.int64, device=device).cumsum(0).to(torch.int32)


@pytest.fixture
def triton_device() -> torch.device:
    """Where Triton kernels run: the CPU under ``TRITON_INTERPRET=1`` (CI), else CUDA, else a skip."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    return torch.device("cuda")


@pytest.fixture
def triton_backends(triton_device: torch.device):
    """``backend="triton"`` of the public ops usable on ``triton_device`` (CPU in the interpreter)
    for the test's duration; the CUDA-only registration is restored afterwards."""
    from ipcv_kernels.triton import register_triton_backends

    register_triton_backends(("cuda", triton_device.type))
    yield triton_device
    register_triton_backends()


def check_generate_and_ratio_zero(model, inputs: dict, tokens_per_block: list[int]) -> None:
    """A full model with IPCV: ratio 0 leaves the logits unchanged; with ratio 0.65 greedy
    ``generate`` runs and the tower's blocks see ``tokens_per_block``; ``remove_ipcv`` restores
    the logits exactly."""
    import ipcv_kernels as ik
    from ipcv_kernels.testing import assert_close

    with torch.no_grad():
        expected = model(**inputs).logits
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2, ratio=0.0, as_layers=1, num_neighbors=3))
        assert_close(model(**inputs).logits, expected)
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=1, num_neighbors=3))
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert ik.get_ipcv_patch(model).last_tokens_per_block == tokens_per_block
    ik.remove_ipcv(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
