"""The library attention backends (``flash_attn``, ``torch_varlen``): registration, clear errors
where they cannot run, and equality with the reference on CUDA where they can."""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

import ipcv_kernels as ik
from ipcv_kernels.ops.attention_backends import flash_attn_unavailable, torch_varlen_unavailable
from ipcv_kernels.reference import ngr_attention_reference
from ipcv_kernels.testing import assert_close_to_reference

LIBRARY_BACKENDS = {"flash_attn": flash_attn_unavailable, "torch_varlen": torch_varlen_unavailable}


@pytest.mark.parametrize("name", list(LIBRARY_BACKENDS))
def test_registered_for_cuda_only(name):
    assert name in ik.ops.backend_names("ngr_attention")
    assert name not in ik.available_backends("ngr_attention", torch.device("cpu"))
    q = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="runs on \\['cuda'\\]"):
        ik.ngr_attention(q, q, q, offsets([2]), offsets([2]), backend=name)


def test_unavailable_backend_names_its_reason(monkeypatch):
    # Simulate an install without flash-attn: the error says what is missing; auto never picks it.
    import ipcv_kernels.ops.attention_backends as module

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    assert "flash-attn package is not installed" in flash_attn_unavailable()
    assert "varlen_attn" in torch_varlen_unavailable()
    from ipcv_kernels.ops.dispatch import resolve_backend

    with pytest.raises(RuntimeError, match=r"flash_attn.*not available: the flash-attn package is not installed"):
        resolve_backend("ngr_attention", "flash_attn", torch.device("cuda"))
    assert resolve_backend("ngr_attention", "auto", torch.device("cuda")).name not in LIBRARY_BACKENDS


def test_cpu_auto_is_unchanged():
    assert ik.ops.backend_for("ngr_attention", "auto", torch.device("cpu")) == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LIBRARY_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_reference(cuda_device, name, dtype):
    reason = LIBRARY_BACKENDS[name]()
    if reason is not None:
        pytest.skip(reason)
    lengths_q, lengths_k = [300, 1, 700], [900, 5, 2100]
    cu_q, cu_k = offsets(lengths_q, cuda_device), offsets(lengths_k, cuda_device)
    generator = torch.Generator(device=cuda_device).manual_seed(0)
    q = torch.randn(sum(lengths_q), 16, 80, device=cuda_device, generator=generator).to(dtype)
    k, v = (torch.randn(sum(lengths_k), 16, 80, device=cuda_device, generator=generator).to(dtype) for _ in range(2))
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, backend=name)
    expected = ngr_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k)
    assert_close_to_reference(got, expected, ik.ngr_attention(q, k, v, cu_q, cu_k, backend="sdpa"))


@pytest.mark.gpu
def test_gpu_half_only(cuda_device):
    q = torch.randn(4, 2, 64, device=cuda_device)
    for name, reason in LIBRARY_BACKENDS.items():
        if reason() is None:
            with pytest.raises(TypeError, match="fp16/bf16"):
                ik.ngr_attention(q, q, q, offsets([4], cuda_device), offsets([4], cuda_device), backend=name)
