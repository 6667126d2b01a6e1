"""What every Triton launcher shares: dtype, precision and layout helpers, and the registration of
its ``"triton"`` backend (``register_triton``, ``register_triton_backends``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ops.dispatch import Backend, register_backend

# (op, launcher, fused steps) of every Triton backend, in registration order.
_TRITON_BACKENDS: list[tuple[str, Callable, frozenset[str]]] = []
_device_types: tuple[str, ...] = ("cuda",)


def register_triton(op: str, fn: Callable, *, fuses: frozenset[str] = frozenset()) -> None:
    """Register ``fn`` as the ``"triton"`` backend of ``op`` (each launcher module calls this once per op)."""
    _TRITON_BACKENDS.append((op, fn, fuses))
    register_backend(op, Backend("triton", fn, _device_types, fuses=fuses))


def register_triton_backends(device_types: Sequence[str] = ("cuda",)) -> None:
    """(Re-)register the ``"triton"`` backend of every op for ``device_types``.

    Import registers them for CUDA. ``("cuda", "cpu")`` is for tests under ``TRITON_INTERPRET=1``
    only: ``auto`` on the CPU would then pick the (slow) interpreter too.
    """
    global _device_types
    _device_types = tuple(device_types)
    for op, fn, fuses in _TRITON_BACKENDS:
        register_backend(op, Backend("triton", fn, _device_types, fuses=fuses))


def kernel_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernels take ``dtype`` (fp64, an oracle dtype, runs the reference instead)."""
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (the default tf32 would lose ~3 decimal digits).
    return "ieee" if dtype == torch.float32 else "tf32"


def row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit-stride last dim (gathered rows are then contiguous reads)."""
    return x if x.stride(-1) == 1 else x.contiguous()
