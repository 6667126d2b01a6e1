"""Backend registry: which implementations of an op exist, where they run, and which ``auto`` picks.

A backend module registers its implementation of each op it provides at import time (one
``register_backend(op, Backend(...))`` per op); the op modules resolve a ``backend=`` string against
this table, so adding a backend never touches the public API. What a backend can do beyond the
op's plain contract (e.g. ``ngr_attention``'s fused rotary) it declares in ``Backend.fuses``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ALL_DEVICES = ("cpu", "cuda")
# The references (backend "torch", registered by each op module) run everywhere and are the last
# resort of ``auto``; every faster backend registers a higher priority.
REFERENCE_PRIORITY = 0


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    name: the ``backend=`` string users pass.
    fn: the implementation; same arguments as the op's reference.
    device_types: device types it runs on (``"cpu"``, ``"cuda"``).
    priority: ``auto`` takes the available backend with the highest priority for the device.
    is_available: returns ``None`` when usable, else the reason it is not (missing package, ...).
    fuses: optional steps of the op that ``fn`` performs itself, named by the op (``ngr_attention``:
        ``"rotary"``, ``"q_gather"``); ``fn`` then takes them as keyword arguments. The op layer does
        the steps a backend does not declare with PyTorch before calling it.
    """

    name: str
    fn: Callable
    device_types: tuple[str, ...]
    priority: int
    is_available: Callable[[], str | None] = field(default=lambda: None)
    fuses: frozenset[str] = frozenset()


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register_backend(op: str, backend: Backend) -> None:
    """Add (or replace, by name) a backend of ``op``; ``auto`` weighs it by ``backend.priority``."""
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def backend_names(op: str) -> list[str]:
    """All registered backend names of ``op`` (available here or not)."""
    return list(_REGISTRY.get(op, {}))


def available_backends(op: str, device: torch.device) -> list[str]:
    """Backends of ``op`` usable on ``device``, ``auto``'s choice first."""
    usable = [b for b in _REGISTRY.get(op, {}).values() if device.type in b.device_types and b.is_available() is None]
    return [b.name for b in sorted(usable, key=lambda b: -b.priority)]


def resolve_backend(op: str, backend: str, device: torch.device) -> Backend:
    """The implementation of ``op`` for ``backend`` on ``device``; clear errors when it cannot run."""
    table = _REGISTRY.get(op, {})
    if backend == "auto":
        names = available_backends(op, device)
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
