"""Shared fixtures. Nothing here touches a device at import or collection time."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
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
    for the test's duration, and ``auto``'s first choice there (``AUTO_ORDER``); the CUDA-only
    registration is restored afterwards."""
    from ipcv_kernels.triton import register_triton_backends

    register_triton_backends(("cuda", triton_device.type))
    yield triton_device
    register_triton_backends()


# Every backend name of the ops. Each op's test module (``tests/ops/test_<op>.py``, whose ``OP``
# names the op, or whose ``OPS`` maps case names to ops for a test parametrised by ``op``) runs
# its cases once per backend of the op through the ``backend`` fixture: where the backend runs in
# this session, else skipped with the reason. A new backend is tested by adding its name here.
BACKENDS = ("torch", "cpp", "vectorized", "triton", "sdpa", "flash_attn", "torch_varlen")


def backends_of(op: str) -> list[str]:
    """The names of ``BACKENDS`` that ``op`` has, and ``"triton"`` where triton is not installed
    (then nothing registers it, and its cases skip saying so)."""
    from ipcv_kernels.ops import backend_names

    registered = backend_names(op)
    no_triton = importlib.util.find_spec("triton") is None
    return [name for name in BACKENDS if name in registered or (name == "triton" and no_triton)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    ops = getattr(metafunc.module, "OPS", None)
    if ops is None:
        op = metafunc.module.OP
        metafunc.parametrize("backend", [(op, name) for name in backends_of(op)], indirect=True, ids=lambda p: p[1])
    else:
        pairs = [(case, (op, name)) for case, op in ops.items() for name in backends_of(op)]
        metafunc.parametrize(
            ("case", "backend"), pairs, indirect=["backend"], ids=lambda p: p[1] if isinstance(p, tuple) else p
        )


@dataclass(frozen=True)
class OpBackend:
    """A backend of the op under test and the device its cases run on."""

    op: str
    name: str
    device: torch.device


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[OpBackend]:
    """``OpBackend`` of ``request.param`` = ``(op, name)``: on the CPU where the backend runs there
    (Triton under ``TRITON_INTERPRET=1``, routed there for the test's duration), else on CUDA,
    else skipped with the reason."""
    from ipcv_kernels.ops import dispatch

    op, name = request.param
    registered = dispatch._REGISTRY.get(op, {}).get(name)
    if registered is None:
        pytest.skip("triton is not installed")
    reason = registered.is_available()
    if reason is not None:
        pytest.skip(reason)
    if name == "triton":
        device = request.getfixturevalue("triton_backends")
    elif "cpu" in registered.device_types:
        device = torch.device("cpu")
    else:
        device = request.getfixturevalue("cuda_device")
    yield OpBackend(op, name, device)


def skip_unsupported(backend: OpBackend, dtype: torch.dtype) -> None:
    """Skip a case the backend cannot run here: bf16 in the Triton interpreter (numpy has none)."""
    if backend.name == "triton" and backend.device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16")


def on_cuda(backend: OpBackend) -> torch.device:
    """The CUDA device for a ``gpu`` case of ``backend``: skips without one, or where the backend
    does not run on CUDA."""
    from ipcv_kernels.ops import dispatch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if "cuda" not in dispatch._REGISTRY[backend.op][backend.name].device_types:
        pytest.skip(f"backend {backend.name!r} does not run on CUDA in this install")
    return torch.device("cuda")


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
