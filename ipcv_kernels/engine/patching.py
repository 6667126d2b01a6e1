"""The one patch mechanism: per-instance method wrappers that stack, hooks, and per-call state.

Every patch of this package (IPCV in a vision tower, an LLM-side pruner in a decoder) is an
``InstancePatch``. Three rules make a patched model behave like the unpatched one:

- **Per instance, exactly reversible, stackable.** ``wrap`` replaces ``module.<name>`` on the
  instance (never the class) by a wrapper around *whatever the instance has now*: the class's
  method, or a wrapper another library set before. ``remove`` puts back exactly what was there.
  If another library wrapped the same method *after* this patch, its wrapper is left in place and
  this patch's wrapper, still inside it, turns into a pass-through: removing one patch never
  drops another's.
- **Per-call state belongs to that call.** What one forward carries from block to block lives in
  a ``contextvars.ContextVar`` of the patch (``bind`` sets it for the duration of a call and
  resets it in a ``finally``), never in an attribute of the shared patch object. Each thread has
  its own context, so two threads running one patched model at once never see each other's state,
  and a call that raises half-way leaves nothing behind for the next one.
- **Nothing on the class.** Hooks are removable handles; ``remove`` removes them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from torch import nn

T = TypeVar("T")


@dataclass
class _Wrapped:
    """One wrapped method: where, the wrapper installed, and what the instance held before."""

    module: nn.Module
    name: str
    wrapper: Callable[..., Any]
    had_own: bool  # the instance had its own attribute (e.g. another library's wrapper)
    previous: Any  # that attribute, put back on removal


class InstancePatch:
    """Base of the per-instance patches (``IPCVPatch``, ``LLMPruningPatch``).

    Subclasses call ``wrap`` / ``add_hook`` in ``install`` and read their per-call state with
    ``state`` (``None`` outside a patched call). ``attribute`` names where ``install`` records the
    patch on its ``root`` module (``get_ipcv_patch`` and friends read it back).
    """

    attribute: ClassVar[str]

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.active = False
        self._wrapped: list[_Wrapped] = []
        self._handles: list[Any] = []  # anything with ``remove()``: hook handles, sub-patches
        self._state: contextvars.ContextVar[Any] = contextvars.ContextVar(f"{type(self).__name__}@{id(self):x}")

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        """Wrap, hook and record the patch on ``root``; subclasses extend it (call ``super()`` last)."""
        self.active = True
        setattr(self.root, self.attribute, self)

    def remove(self) -> None:
        """Undo ``install`` exactly (see the module docstring for wrappers added on top of ours)."""
        self.active = False
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        for wrapped in reversed(self._wrapped):
            if vars(wrapped.module).get(wrapped.name) is not wrapped.wrapper:
                continue  # wrapped again on top by someone else: ours stays there as a pass-through
            if wrapped.had_own:
                setattr(wrapped.module, wrapped.name, wrapped.previous)
            else:
                delattr(wrapped.module, wrapped.name)  # the class's method shows through again
        self._wrapped.clear()
        if vars(self.root).get(self.attribute) is self:
            delattr(self.root, self.attribute)

    def wrap(self, module: nn.Module, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Set ``module.<name>`` (on the instance) to ``make(current)``, ``current`` being what the
        instance has now. Once the patch is removed, the wrapper passes every call to ``current``."""
        had_own = name in vars(module)
        current = getattr(module, name)
        patched = make(current)

        @functools.wraps(current)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return (patched if self.active else current)(*args, **kwargs)

        self._wrapped.append(_Wrapped(module, name, wrapper, had_own, vars(module).get(name)))
        setattr(module, name, wrapper)

    def add_hook(self, handle: Any) -> None:
        """Keep a removable handle (``module.register_forward_pre_hook(...)``, ...) until ``remove``."""
        self._handles.append(handle)

    # -- per-call state -------------------------------------------------------------------------
    @property
    def state(self) -> Any:
        """The state of the call in progress in this thread / context, or ``None``."""
        return self._state.get(None)

    @contextlib.contextmanager
    def bind(self, state: T) -> Iterator[T]:
        """``state`` is ``self.state`` inside the ``with`` block (this context only), then reset."""
        token = self._state.set(state)
        try:
            yield state
        finally:
            self._state.reset(token)
