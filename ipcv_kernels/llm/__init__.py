"""LLM-side token pruning (FastV, DART) inside the language model of a multimodal LLM.

Use through ``apply_ipcv(model, config, llm_pruner=FastV(...) or DART(...))``; the functions here
install / remove the LLM side alone.
"""

from __future__ import annotations

from torch import nn

from .patch import LLM_PATCH_ATTRIBUTE, LLMPruningPatch
from .pruners import DART, FastV, LLMPruner, PruningInputs
from .qwen2_vl import find_language_model


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
