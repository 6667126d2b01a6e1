"""Model integrations: ``apply_ipcv`` / ``remove_ipcv`` and the per-family adapters."""

from __future__ import annotations

from torch import nn

from ..config import IPCVConfig
from .engine import PATCH_ATTRIBUTE, IPCVPatch
from .registry import find_tower, supported_classes


def apply_ipcv(model: nn.Module, config: IPCVConfig | None = None) -> nn.Module:
    """Patch ``model``'s vision tower in place with IPCV and return ``model``.

    Args:
        model: a supported Hugging Face model instance: the full conditional-generation model, the
            base model, or the vision tower itself (see ``supported_classes()``). Only this
            instance is patched; other instances of the class are untouched.
        config: IPCV settings; ``None`` uses ``IPCVConfig()`` (the paper's Qwen2-VL-7B setting).

    The tower keeps its output types and shapes: every dropped token is restored before its
    merger. Applying to an already patched model replaces the previous patch.

    Raises:
        TypeError: unsupported model, or ``config`` not an ``IPCVConfig``.
        ValueError: ``config.prune_layer`` outside ``[1, depth)`` of this tower.
    """
    if config is None:
        config = IPCVConfig()
    if not isinstance(config, IPCVConfig):
        raise TypeError(f"config must be an IPCVConfig, got {type(config).__name__}")
    tower, adapter = find_tower(model)
    patch = IPCVPatch(tower, adapter, config)  # validates the layer range before touching anything
    if hasattr(tower, PATCH_ATTRIBUTE):
        getattr(tower, PATCH_ATTRIBUTE).remove()
    patch.install()
    return model


def remove_ipcv(model: nn.Module) -> nn.Module:
    """Undo ``apply_ipcv`` on ``model`` (a no-op if it is not patched) and return it."""
    tower, _ = find_tower(model)
    if hasattr(tower, PATCH_ATTRIBUTE):
        getattr(tower, PATCH_ATTRIBUTE).remove()
    return model


def get_ipcv_patch(model: nn.Module) -> IPCVPatch | None:
    """The installed patch (config, ``last_tokens_per_block``) of ``model``'s tower, if any."""
    tower, _ = find_tower(model)
    return getattr(tower, PATCH_ATTRIBUTE, None)


__all__ = ["apply_ipcv", "get_ipcv_patch", "remove_ipcv", "supported_classes"]
