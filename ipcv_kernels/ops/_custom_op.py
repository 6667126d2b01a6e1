"""Defines an IPCV custom op and its fake in one place (quack's ``cute_op`` idea).

Every op module calls ``ipcv_op`` once. Two ``torch.library`` namespaces share that op's one fake:

- ``ipcv_kernels::<op>``: defined here from the decorated implementation, whose annotations are the
  schema: the op's arguments, then ``backend: str``. The implementation resolves ``backend`` in
  the registry (``dispatch.py``) and runs that backend.
- ``ipcv::<op>`` (``compiled=True``): defined in C++ by ``csrc/register.cpp`` with the op's
  arguments and no ``backend``. Only its fake is registered here, once ``cpp_backend`` has loaded
  the extension (``compiled_extension_loaded``).

A fake takes the op's arguments without ``backend`` and only describes the outputs (shape, dtype,
device; an unbacked size where a length depends on values), so the ops trace under
``torch.compile`` without running.

The public functions call the ``IPCVOp`` returned here, not ``torch.ops.ipcv_kernels.<op>``: in
eager mode it calls the implementation directly, since the custom-op dispatcher's argument
handling costs tens of microseconds per call, more than a small op's work (quack does the same).
While ``torch.compile`` / ``torch.export`` trace, or a Python dispatch mode (a fake-tensor or
tracing mode) is active, it calls the registered op, so that tracing sees ``ipcv_kernels::<op>``
and its fake, never the implementation. The ops are inference-only: no autograd formula is registered
in either namespace, and the public functions run under ``torch.no_grad()``. The custom ops do no
input validation; the public functions of the op modules do.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

Fake = Callable[..., object]

# Fakes of the ops that also exist in C++, registered for ``ipcv::<op>`` once the extension loads.
_COMPILED_FAKES: dict[str, Fake] = {}
_extension_loaded = False


def autograd_free(function: Callable[..., object]) -> Callable[..., object]:
    """``function`` run with grad mode off, as ``torch.no_grad()`` does, but without entering a
    context where it is off already (the usual case: inference runs under ``no_grad``), since the
    context costs a few microseconds per call of an op that may take not much more."""

    @functools.wraps(function)
    def without_grad(*args: object, **kwargs: object) -> object:
        if not torch.is_grad_enabled():
            return function(*args, **kwargs)
        with torch.no_grad():
            return function(*args, **kwargs)

    return without_grad


class IPCVOp:
    """A defined op: called with the op's arguments (``backend`` last), it runs ``implementation``
    directly in eager mode and ``torch.ops.ipcv_kernels.<name>`` where something traces.

    ``registered``: the op's ``torch.ops.ipcv_kernels.<name>.default``, what tracing sees.
    """

    def __init__(self, implementation: Callable[..., object], registered: torch._ops.OpOverload) -> None:
        self.implementation = implementation
        self.registered = registered

    def __call__(self, *args: object) -> object:
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return self.registered(*args)
        return self.implementation(*args)


def ipcv_op(
    name: str, *, fake: Fake, mutates_args: tuple[str, ...] = (), compiled: bool = False
) -> Callable[[Callable[..., object]], IPCVOp]:
    """Decorator: the function becomes the implementation of ``torch.ops.ipcv_kernels.<name>``
    (and the name an ``IPCVOp``, which the public function calls).

    Args:
        name: the op's name in both namespaces.
        fake: the shape-only implementation, over the op's arguments without ``backend``.
        mutates_args: arguments written in place (as ``torch.library.custom_op``).
        compiled: ``csrc/`` defines ``ipcv::<name>`` with the same arguments minus ``backend``;
            register ``fake`` for it too.
    """

    def define(implementation: Callable[..., object]) -> IPCVOp:
        if list(inspect.signature(implementation).parameters)[-1] != "backend":
            raise TypeError(f"ipcv_kernels::{name}: the implementation's last argument must be `backend: str`")
        op = torch.library.custom_op(f"ipcv_kernels::{name}", implementation, mutates_args=mutates_args)
        # The trailing ``backend`` string never changes an output's shape.
        op.register_fake(lambda *args: fake(*args[:-1]))
        if compiled:
            _COMPILED_FAKES[name] = fake
            if _extension_loaded:
                torch.library.register_fake(f"ipcv::{name}")(fake)
        return IPCVOp(implementation, getattr(torch.ops.ipcv_kernels, name).default)

    return define


def compiled_extension_loaded() -> None:
    """Register the fakes of ``ipcv::*`` (called once the extension has defined those ops)."""
    global _extension_loaded
    _extension_loaded = True
    for name, fake in _COMPILED_FAKES.items():
        torch.library.register_fake(f"ipcv::{name}")(fake)
