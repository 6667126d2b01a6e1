"""LLM-side token pruning (FastV, DART) inside the language model of a multimodal LLM.

Use through ``apply_ipcv``, which finds the language model in the family table
(``ipcv_kernels.families``) and installs an ``LLMPruningPatch`` on it::

    from ipcv_kernels import DART, FastV, IPCVConfig, apply_ipcv, remove_ipcv

    apply_ipcv(model, IPCVConfig(), llm_pruner=DART(layer=2, ratio=0.778))  # both sides
    apply_ipcv(model, llm_pruner=FastV(layer=2, ratio=0.5))  # the LLM side alone
    model.generate(**inputs)  # prefill prunes image / video tokens from decoder layer 2 on
    remove_ipcv(model)  # undoes both

A custom pruner subclasses ``LLMPruner`` and implements ``select``.
"""

from .patch import LLM_PATCH_ATTRIBUTE, LLMPruningPatch, non_attention_layers
from .pruners import DART, FastV, LLMPruner, PruningInputs

__all__ = [
    "DART",
    "LLM_PATCH_ATTRIBUTE",
    "FastV",
    "LLMPruner",
    "LLMPruningPatch",
    "PruningInputs",
    "non_attention_layers",
]
