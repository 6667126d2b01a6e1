"""Model integrations: ``apply_ipcv`` / ``remove_ipcv`` and the per-family adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..config import IPCVConfig
from ..llm import LLMPruner, prepare_llm_pruning, remove_llm_pruning
from .engine import PATCH_ATTRIBUTE, IPCVPatch
from .internvl import set_tiles_per_image
from .registry import find_tower, supported_classes


def apply_ipcv(model: nn.Module, config: IPCVConfig | None = None, *, llm_pruner: LLMPruner | None = None) -> nn.Module:
    """Patch ``model`` in place with IPCV in its vision tower and/or an LLM-side pruner; return it.

    Args:
        model: a supported Hugging Face model instance: the full conditional-generation model, the
            base model, or the vision tower itself (see ``supported_classes()``). Only this
            instance is patched; other instances of the class are untouched.
        config: IPCV settings. ``None`` means ``IPCVConfig.for_model(model)`` (the family's
            recommended setting: the paper's Qwen2-VL-7B one for the Qwen families, prune layer 7 /
            3 stabilisation blocks for InternVL) when ``llm_pruner`` is ``None`` too, and no
            vision-side IPCV when a pruner is given.
        llm_pruner: an LLM-side pruner (``FastV``, ``DART``) for the language model, or ``None``.
            Needs a model with a language model (not a bare tower). See ``ipcv_kernels.llm``.

    The tower keeps its output types and shapes: every dropped token is restored before its
    merger. Applying to an already patched model replaces the previous patches: afterwards the
    model carries exactly what this call describes.

    Raises:
        TypeError: unsupported model, ``config`` not an ``IPCVConfig``, ``llm_pruner`` not an
            ``LLMPruner``, or a pruner for a model without a language model.
        ValueError: ``config.prune_layer`` outside ``[1, depth)`` of this tower, or
            ``llm_pruner.layer`` outside ``[1, num_hidden_layers)`` of the language model.
    """
    if config is None and llm_pruner is None:
        config = IPCVConfig.for_model(model)
    if config is not None and not isinstance(config, IPCVConfig):
        raise TypeError(f"config must be an IPCVConfig, got {type(config).__name__}")
    tower, adapter = find_tower(model)
    # Validate both sides (layer ranges included) before touching the model.
    patch = IPCVPatch(tower, adapter, config) if config is not None else None
    llm_patch = prepare_llm_pruning(model, llm_pruner) if llm_pruner is not None else None
    remove_ipcv(model)
    if patch is not None:
        patch.install()
    if llm_patch is not None:
        llm_patch.install()
    return model


def remove_ipcv(model: nn.Module) -> nn.Module:
    """Undo ``apply_ipcv`` on ``model``, both sides (a no-op if it is not patched); return it."""
    tower, _ = find_tower(model)
    if hasattr(tower, PATCH_ATTRIBUTE):
        getattr(tower, PATCH_ATTRIBUTE).remove()
    remove_llm_pruning(model)
    return model


@contextlib.contextmanager
def ipcv_applied(
    model: nn.Module, config: IPCVConfig | None = None, *, llm_pruner: LLMPruner | None = None
) -> Iterator[nn.Module]:
    """``with ipcv_applied(model, config): ...``: ``apply_ipcv`` on entry, ``remove_ipcv`` on exit
    (also when the body raises). Same arguments as ``apply_ipcv``."""
    apply_ipcv(model, config, llm_pruner=llm_pruner)
    try:
        yield model
    finally:
        remove_ipcv(model)


def get_ipcv_patch(model: nn.Module) -> IPCVPatch | None:
    """The installed patch (config, ``last_tokens_per_block``) of ``model``'s tower, if any."""
    tower, _ = find_tower(model)
    return getattr(tower, PATCH_ATTRIBUTE, None)


__all__ = ["apply_ipcv", "get_ipcv_patch", "ipcv_applied", "remove_ipcv", "set_tiles_per_image", "supported_classes"]
