"""Backend registry: which implementations of an op exist, where they run, and which ``auto`` picks.

A backend module registers its implementation of each op it provides at import time (one
``register_backend(op, Backend(...))`` per op); the op modules resolve a ``backend=`` string against
this table, so adding a backend never touches the public API. What a backend can do beyond the
op's plain contract (e.g. ``ngr_attention``'s fused rotary) it declares in ``Backend.fuses``.
Which backend ``auto`` picks on each device type is ``AUTO_ORDER`` alone; a new backend adds its
name there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ALL_DEVICES = ("cpu", "cuda")

# ``auto``'s order per device type, best first: the one place that ranks the backends (of every
# op; a backend competes only with the others registered for the same op). A registered backend
# missing from a device's order is never ``auto`` there.
# - CUDA: the Triton kernels (fused, no host reads); then ``vectorized`` (selection and planning
#   on the device without a kernel of their own); then the attention libraries, flash-attn before
#   PyTorch's varlen kernel; ``cpp``'s CUDA kernels (built, not yet run on a GPU: picked only where
#   Triton is missing); per-segment ``sdpa``; the references last.
# - CPU: ``triton`` only runs there under the interpreter, registered for the CPU by tests alone
#   (``register_triton_backends``), which then want it picked; the compiled ``cpp`` ops; ``sdpa``;
#   the references (the default where ``cpp`` is not built); ``vectorized`` never (its device-side
#   formulation gains nothing on the CPU; name it to run it there).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "vectorized", "flash_attn", "cpp", "torch_varlen", "sdpa", "torch"),
    "cpu": ("triton", "cpp", "sdpa", "torch"),
}


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    name: the ``backend=`` string users pass.
    fn: the implementation; same arguments as the op's reference.
    device_types: device types it runs on (``"cpu"``, ``"cuda"``); ``auto`` ranks it by ``AUTO_ORDER``.
    is_available: returns ``None`` when usable, else the reason it is not (missing package, ...).
    fuses: optional steps of the op that ``fn`` performs itself, named by the op (``ngr_attention``:
        ``"rotary"``, ``"q_gather"``); ``fn`` then takes them as keyword arguments. The op layer does
        the steps a backend does not declare with PyTorch before calling it.
    """

    name: str
    fn: Callable
    device_types: tuple[str, ...]
    is_available: Callable[[], str | None] = field(default=lambda: None)
    fuses: frozenset[str] = frozenset()


_REGISTRY: dict[str, dict[str, Backend]] = {}
# (op, backend string, device type) -> the backend it resolved to. Resolution runs on every op
# call, and asking every backend ``is_available`` (a package lookup for the attention libraries)
# costs more than a small op's work: answers are kept until the next registration, which is when
# they can change. Resolution does not depend on the dtype (backends that do not take a dtype run
# a fallback themselves), so the dtype is not part of the key.
_RESOLVED: dict[tuple[str, str, str], Backend] = {}


def register_backend(op: str, backend: Backend) -> None:
    """Add (or replace, by name) a backend of ``op``; ``auto`` ranks it by ``AUTO_ORDER``."""
    _REGISTRY.setdefault(op, {})[backend.name] = backend
    _RESOLVED.clear()


def backend_names(op: str) -> list[str]:
    """All registered backend names of ``op`` (available here or not)."""
    return list(_REGISTRY.get(op, {}))


def available_backends(op: str, device: torch.device) -> list[str]:
    """Backends of ``op`` usable on ``device``: ``auto``'s order first, then any it never picks there."""
    order = AUTO_ORDER.get(device.type, ())
    usable = [
        b.name for b in _REGISTRY.get(op, {}).values() if device.type in b.device_types and b.is_available() is None
    ]
    return sorted(usable, key=lambda name: order.index(name) if name in order else len(order))


def resolve_backend(op: str, backend: str, device: torch.device) -> Backend:
    """The implementation of ``op`` for ``backend`` on ``device``; clear errors when it cannot run.

    Answers are cached per (op, backend, device type) until a backend registers; errors are not.
    """
    key = (op, backend, device.type)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _RESOLVED[key] = _resolve(op, backend, device)
    return chosen


def _resolve(op: str, backend: str, device: torch.device) -> Backend:
    table = _REGISTRY.get(op, {})
    if backend == "auto":
        names = [name for name in available_backends(op, device) if name in AUTO_ORDER.get(device.type, ())]
        if not names:
            raise RuntimeError(f"{op}: no backend can run on {device}")
        return table[names[0]]
    if backend not in table:
        raise ValueError(f"backend must be 'auto' or one of {list(table)} for {op}, got {backend!r}")
    chosen = table[backend]
    if device.type not in chosen.device_types:
        raise ValueError(f"backend {backend!r} of {op} runs on {list(chosen.device_types)}, got {device.type} tensors")
    reason = chosen.is_available()
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} of {op} is not available: {reason}")
    return chosen


def backend_for(op: str, backend: str, device: torch.device) -> str:
    """The backend name ``backend`` resolves to for ``op`` on ``device`` (``auto`` made concrete)."""
    return resolve_backend(op, backend, device).name
