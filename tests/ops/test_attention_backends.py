"""The library attention backends (``flash_attn``, ``torch_varlen``): registration, clear errors
where they cannot run, and equality with the reference on CUDA where they can."""

from __future__ import annotations

import pytest
import torch
from conftest import offsets

import ipcv_kernels as ik
from ipcv_kernels.ops.attention_backends import flash_attn_unavailable, torch_varlen_unavailable
from ipcv_kernels.reference import ngr_attention_reference, unfused_attention_inputs
from ipcv_kernels.reference.rotary import apply_rotary_vision
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
    from ipcv_kernels.ops import dispatch

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # resolutions cached before the simulated uninstall
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
    lengths_q, lengths_k = [300, 1, 700, 5], [900, 5, 2100, 0]  # the last queries have no keys: rows of 0
    cu_q, cu_k = offsets(lengths_q, cuda_device), offsets(lengths_k, cuda_device)
    generator = torch.Generator(device=cuda_device).manual_seed(0)
    q = torch.randn(sum(lengths_q), 16, 80, device=cuda_device, generator=generator).to(dtype)
    k, v = (torch.randn(sum(lengths_k), 16, 80, device=cuda_device, generator=generator).to(dtype) for _ in range(2))
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, backend=name)
    expected = ngr_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k)
    assert_close_to_reference(got, expected, ik.ngr_attention(q, k, v, cu_q, cu_k, backend="sdpa"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LIBRARY_BACKENDS))
def test_gpu_fp32_runs_sdpa(cuda_device, name):
    # The library kernels take fp16/bf16 only: fp32 runs per-segment sdpa, so auto never fails.
    q = torch.randn(4, 2, 64, device=cuda_device)
    cu = offsets([4], cuda_device)
    got = ik.ngr_attention(q, q, q, cu, cu, backend=name)
    torch.testing.assert_close(got, ik.ngr_attention(q, q, q, cu, cu, backend="sdpa"))


def fused_case(n=12, heads=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, head_dim, generator=generator) for _ in range(3))
    cos, sin = (torch.randn(n, head_dim, generator=generator) for _ in range(2))
    rows = torch.tensor([0, 3, 4, 9, 11])
    return q, k, v, (cos, sin), rows, offsets([3, 2]), offsets([7, 5])


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_fused_options_on_unfused_backends(backend):
    # Backends without fusion get the gathered, rotated tensors computed by PyTorch first.
    q, k, v, (cos, sin), rows, cu_q, cu_k = fused_case()
    expected = ngr_attention_reference(
        apply_rotary_vision(q[rows], cos[rows], sin[rows]), apply_rotary_vision(k, cos, sin), v, cu_q, cu_k
    )
    by_rows = ik.ngr_attention(q, k, v, cu_q, cu_k, rotary=(cos, sin), q_rows=rows, backend=backend)
    by_positions = ik.ngr_attention(q[rows], k, v, cu_q, cu_k, rotary=(cos, sin), q_positions=rows, backend=backend)
    torch.testing.assert_close(by_rows, expected)
    torch.testing.assert_close(by_positions, expected)
    gathered = ik.ngr_attention(q, k, v, cu_q, cu_k, q_rows=rows, backend=backend)
    torch.testing.assert_close(gathered, ngr_attention_reference(q[rows], k, v, cu_q, cu_k))


@pytest.mark.parametrize(
    ("fuses", "fused"), [(frozenset({"rotary", "q_gather"}), True), (frozenset({"q_gather"}), False)]
)
def test_backend_gets_the_steps_it_declares(monkeypatch, fuses, fused):
    # A backend declaring every requested step gets them as keywords; one declaring only some gets
    # all of them done by PyTorch first (the gathered rows are also the rotary rows).
    from ipcv_kernels.ops import dispatch

    calls = []

    def spy(q, k, v, cu_q, cu_k, softmax_scale, **steps):
        calls.append(steps)
        if steps:
            q, k = unfused_attention_inputs(q, k, steps["rotary"], steps["q_rows"], steps["q_positions"])
        return ngr_attention_reference(q, k, v, cu_q, cu_k, softmax_scale)

    monkeypatch.setitem(dispatch._REGISTRY["ngr_attention"], "spy", dispatch.Backend("spy", spy, ("cpu",), fuses=fuses))
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # the registry changed behind register_backend's back
    q, k, v, rotary, rows, cu_q, cu_k = fused_case()
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, rotary=rotary, q_rows=rows, backend="spy")
    torch.testing.assert_close(got, ik.ngr_attention(q, k, v, cu_q, cu_k, rotary=rotary, q_rows=rows, backend="torch"))
    assert (calls[0]["q_rows"] is rows) if fused else calls == [{}]


def test_fused_options_are_validated():
    q, k, v, (cos, sin), rows, cu_q, cu_k = fused_case()

    def call(q=q, cu_q=cu_q, **options):
        return ik.ngr_attention(q, k, v, cu_q, cu_k, backend="torch", **options)

    with pytest.raises(ValueError, match="mutually exclusive"):
        call(rotary=(cos, sin), q_rows=rows, q_positions=rows)
    with pytest.raises(ValueError, match="q_positions needs rotary"):
        call(q=q[rows], q_positions=rows)
    with pytest.raises(TypeError, match="rotary must be a \\(cos, sin\\) tuple"):
        call(rotary=cos, q_rows=rows)
    with pytest.raises(ValueError, match="rotary cos must have shape"):
        call(rotary=(cos[:5], sin), q_rows=rows)
    with pytest.raises(ValueError, match="q_rows must hold row indices in \\[0, 12\\)"):
        call(q_rows=torch.tensor([0, 3, 4, 9, 12]))
    with pytest.raises(TypeError, match="q_rows must have dtype"):
        call(q_rows=rows.float())
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the number of rows \\(5\\)"):
        call(q_rows=rows, cu_q=offsets([3, 3]))
    with pytest.raises(ValueError, match="q_positions must have 12 entries"):
        call(rotary=(cos, sin), q_positions=rows, cu_q=offsets([6, 6]))
    with pytest.raises(ValueError, match="even head dim"):
        odd = torch.randn(12, 2, 7)
        ik.ngr_attention(odd, odd, odd, offsets([12]), offsets([12]), rotary=(cos[:, :7], sin[:, :7]))
