"""The backend registry (``ipcv_kernels.ops.dispatch``): what ``auto`` picks on each device
(``AUTO_ORDER``), registration per device, clear errors for backends that cannot run, the resolution
cache, the optional steps a backend declares, and the eager call path past the custom-op
dispatcher (equal, bit for bit, to the registered op)."""

from __future__ import annotations

import pytest
import torch
from conftest import offsets
from torch.utils._python_dispatch import TorchDispatchMode

import ipcv_kernels as ik
from ipcv_kernels.ops import backend_for, cpp_backend, dispatch
from ipcv_kernels.ops.attention_backends import flash_attn_unavailable, torch_varlen_unavailable
from ipcv_kernels.reference import ngr_attention_reference, unfused_attention_inputs

LIBRARY_BACKENDS = {"flash_attn": flash_attn_unavailable, "torch_varlen": torch_varlen_unavailable}
OPS = ("knn", "ngr_reconstruct", "ngr_restore", "ngr_attention", "select_tokens", "plan")


@pytest.fixture
def cpp():
    if cpp_backend.UNAVAILABLE_REASON is not None:
        pytest.skip(cpp_backend.UNAVAILABLE_REASON)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry (and an empty cache) that the test may change."""
    monkeypatch.setattr(dispatch, "_REGISTRY", {op: dict(table) for op, table in dispatch._REGISTRY.items()})
    monkeypatch.setattr(dispatch, "_RESOLVED", {})


def test_every_registered_backend_is_ranked_on_its_devices():
    # A backend missing from AUTO_ORDER would never be auto: only "vectorized" on the CPU, on purpose.
    for op in OPS:
        for name in ik.ops.backend_names(op):
            for device in dispatch._REGISTRY[op][name].device_types:
                assert name in dispatch.AUTO_ORDER[device] or (name, device) == ("vectorized", "cpu"), (op, name)


def test_cpu_auto(cpp):
    cpu = torch.device("cpu")
    for op in ("knn", "ngr_reconstruct", "ngr_restore", "select_tokens", "plan"):
        assert backend_for(op, "auto", cpu) == "cpp", op


def test_cpu_auto_attention_is_sdpa():
    assert backend_for("ngr_attention", "auto", torch.device("cpu")) == "sdpa"


def test_cuda_auto():
    # Resolution never touches the device: it can be asked without one.
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    for op in ("knn", "ngr_reconstruct", "ngr_restore", "ngr_attention"):
        assert backend_for(op, "auto", cuda) == "triton", op
    for op in ("select_tokens", "plan"):
        assert backend_for(op, "auto", cuda) == "vectorized", op


def test_triton_registration_is_cuda_only_by_default():
    # Importing the package must not make the interpreter the CPU default.
    assert "triton" not in ik.available_backends("knn", torch.device("cpu"))
    assert "vectorized" not in dispatch.AUTO_ORDER["cpu"]


@pytest.mark.parametrize("name", list(LIBRARY_BACKENDS))
def test_library_backends_are_registered_for_cuda_only(name):
    assert name in ik.ops.backend_names("ngr_attention")
    assert name not in ik.available_backends("ngr_attention", torch.device("cpu"))
    q = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="runs on \\['cuda'\\]"):
        ik.ngr_attention(q, q, q, offsets([2]), offsets([2]), backend=name)


def test_unavailable_backend_names_its_reason(monkeypatch):
    # Simulate an install without flash-attn: the error says what is missing; auto never picks it.
    import ipcv_kernels.ops.attention_backends as module

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # resolutions cached before the simulated uninstall
    assert "flash-attn package is not installed" in flash_attn_unavailable()
    assert "varlen_attn" in torch_varlen_unavailable()
    with pytest.raises(RuntimeError, match=r"flash_attn.*not available: the flash-attn package is not installed"):
        dispatch.resolve_backend("ngr_attention", "flash_attn", torch.device("cuda"))
    assert dispatch.resolve_backend("ngr_attention", "auto", torch.device("cuda")).name not in LIBRARY_BACKENDS


def test_missing_extension_raises_clear_error(monkeypatch):
    monkeypatch.setattr(cpp_backend, "UNAVAILABLE_REASON", "the compiled extension is not available; build it")
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # resolutions cached while it was available
    x = torch.randn(8, 4)
    assert backend_for("plan", "auto", torch.device("cpu")) != "cpp"
    with pytest.raises(RuntimeError, match=r"backend 'cpp' of plan is not available.*build it"):
        ik.plan_ipcv(x, x + 1, offsets([8]), offsets([8]), 0.5, 2, backend="cpp")


def test_resolution_is_cached_until_a_backend_registers(scratch_registry):
    asked = []

    def available() -> None:
        asked.append(1)

    reference = dispatch._REGISTRY["knn"]["torch"]
    dispatch.register_backend("knn", dispatch.Backend("torch", reference.fn, reference.device_types, available))
    cpu = torch.device("cpu")
    first = dispatch.resolve_backend("knn", "torch", cpu)
    assert dispatch.resolve_backend("knn", "torch", cpu) is first and len(asked) == 1
    dispatch.register_backend("knn", reference)
    assert dispatch.resolve_backend("knn", "torch", cpu) is reference


@pytest.mark.parametrize(
    ("fuses", "fused"), [(frozenset({"rotary", "q_gather"}), True), (frozenset({"q_gather"}), False)]
)
def test_backend_gets_the_steps_it_declares(scratch_registry, fuses, fused):
    # A backend declaring every requested step gets them as keywords; one declaring only some gets
    # all of them done by PyTorch first (the gathered rows are also the rotary rows).
    calls = []

    def spy(q, k, v, cu_q, cu_k, softmax_scale, **steps):
        calls.append(steps)
        if steps:
            q, k = unfused_attention_inputs(q, k, steps["rotary"], steps["q_rows"], steps["q_positions"])
        return ngr_attention_reference(q, k, v, cu_q, cu_k, softmax_scale)

    dispatch.register_backend("ngr_attention", dispatch.Backend("spy", spy, ("cpu",), fuses=fuses))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, 8, generator=generator) for _ in range(3))
    rotary = tuple(torch.randn(12, 8, generator=generator) for _ in range(2))
    rows, cu_q, cu_k = torch.tensor([0, 3, 4, 9, 11]), offsets([3, 2]), offsets([7, 5])
    got = ik.ngr_attention(q, k, v, cu_q, cu_k, rotary=rotary, q_rows=rows, backend="spy")
    torch.testing.assert_close(got, ik.ngr_attention(q, k, v, cu_q, cu_k, rotary=rotary, q_rows=rows, backend="torch"))
    assert (calls[0]["q_rows"] is rows) if fused else calls == [{}]


class OpsSeen(TorchDispatchMode):
    """Records the ``ipcv_kernels`` ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "ipcv_kernels":
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_and_equal_the_registered_op():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, 2, 16, generator=generator) for n in (8, 16, 16))
    cu_q, cu_k = offsets([4, 4]), offsets([8, 8])
    eager = ik.ngr_attention(q, k, v, cu_q, cu_k, skip_check=True)
    registered = torch.ops.ipcv_kernels.ngr_attention(q, k, v, cu_q, cu_k, None, None, None, None, None, "auto")
    assert torch.equal(eager, registered)
    # Under a dispatch mode (as fake-tensor tracing runs) the public op goes through the registered one.
    with OpsSeen() as mode:
        traced = ik.ngr_attention(q, k, v, cu_q, cu_k, skip_check=True)
    assert mode.seen == ["ipcv_kernels::ngr_attention"] and torch.equal(traced, eager)


def test_outputs_carry_no_grad_history_whatever_the_grad_mode():
    q = torch.randn(4, 2, 8, requires_grad=True)
    cu = offsets([4])
    assert ik.ngr_attention(q, q, q, cu, cu, backend="torch").grad_fn is None
    with torch.no_grad():
        assert not ik.ngr_attention(q, q, q, cu, cu, backend="torch").requires_grad
    assert torch.is_grad_enabled()  # the grad mode is the caller's again
