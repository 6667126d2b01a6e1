"""LLM-side token pruning (FastV, DART) inside the language model of a multimodal LLM.

Use through ``apply_ipcv``; the functions here are its LLM-side building blocks::

    from ipcv_kernels import DART, FastV, IPCVConfig, apply_ipcv, remove_ipcv

    apply_ipcv(model, IPCVConfig(), llm_pruner=DART(layer=2, ratio=0.778))  # both sides
    apply_ipcv(model, llm_pruner=FastV(layer=2, ratio=0.5))  # the LLM side alone
    model.generate(**inputs)  # prefill prunes image / video tokens from decoder layer 2 on
    remove_ipcv(model)  # undoes both

Supported models: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and InternVL (full model or ``*Model``). A
custom pruner subclasses ``LLMPruner`` and implements ``select``.
"""

from __future__ import annotations

from torch import nn

from .families import find_language_model
from .patch import LLM_PATCH_ATTRIBUTE, LLMPruningPatch
from .pruners import DART, FastV, LLMPruner, PruningInputs


def prepare_llm_pruning(model: nn.Module, pruner: LLMPruner) -> LLMPruningPatch:
    """A validated, not yet installed patch of ``model``'s language model.

    Raises:
        TypeError: ``pruner`` is not an ``LLMPruner``, or ``model`` has no supported language model.
        ValueError: ``pruner.layer`` outside ``[1, num_hidden_layers)`` of this model.
    """
    if not isinstance(pruner, LLMPruner):
        raise TypeError(f"llm_pruner must be an LLMPruner (FastV, DART), got {type(pruner).__name__}")
    multimodal, text_model, token_ids = find_language_model(model)
    return LLMPruningPatch(multimodal, text_model, pruner, token_ids)


def get_llm_pruning_patch(model: nn.Module) -> LLMPruningPatch | None:
    """The installed LLM-side patch of ``model`` (its pruner, ``last_kept``), if any."""
    try:
        _, text_model, _ = find_language_model(model)
    except TypeError:
        return None
    return getattr(text_model, LLM_PATCH_ATTRIBUTE, None)


def remove_llm_pruning(model: nn.Module) -> None:
    """Remove the LLM-side patch of ``model`` if one is installed (a no-op otherwise)."""
    patch = get_llm_pruning_patch(model)
    if patch is not None:
        patch.remove()


__all__ = [
    "DART",
    "FastV",
    "LLMPruner",
    "LLMPruningPatch",
    "PruningInputs",
    "find_language_model",
    "get_llm_pruning_patch",
    "prepare_llm_pruning",
    "remove_llm_pruning",
]
