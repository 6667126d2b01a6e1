"""ipcv_kernels: IPCV token compression for the vision encoders of multimodal LLMs.

Public API: the ops (``knn``, ``ngr_reconstruct``, ``ngr_restore``, ``ngr_attention``, ``token_scores``,
``select_tokens``, ``plan_ipcv``), ``IPCVConfig`` and its token selectors (``register_selector``,
``available_selectors``, ``SelectionInputs``; ``ipcv_kernels.selectors``) and ``apply_ipcv`` / ``remove_ipcv`` /
``recommended_config``, and the LLM-side pruners ``FastV`` / ``DART``
(``apply_ipcv(model, config, llm_pruner=...)``). All ops are inference-only (no autograd).
The behavioural contract is ``docs/spec.md``.
"""

import importlib.util

from .api import apply_ipcv, get_ipcv_patch, get_llm_pruning_patch, ipcv_applied, remove_ipcv, set_tiles_per_image
from .config import IPCVConfig
from .families import recommended_config, supported_classes
from .llm import DART, FastV, LLMPruner
from .ops import (
    available_backends,
    knn,
    ngr_attention,
    ngr_reconstruct,
    ngr_restore,
    plan_ipcv,
    select_tokens,
    shrink_cu_seqlens,
    token_scores,
)
from .reference import IPCVPlan, TokenSelection
from .selectors import SelectionInputs, available_selectors, register_selector

# The Triton backends (optional: ``pip install ipcv_kernels[triton]``) register themselves on import.
if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "DART",
    "FastV",
    "IPCVConfig",
    "IPCVPlan",
    "LLMPruner",
    "SelectionInputs",
    "TokenSelection",
    "apply_ipcv",
    "available_backends",
    "available_selectors",
    "get_ipcv_patch",
    "get_llm_pruning_patch",
    "ipcv_applied",
    "knn",
    "ngr_attention",
    "ngr_reconstruct",
    "ngr_restore",
    "plan_ipcv",
    "recommended_config",
    "register_selector",
    "remove_ipcv",
    "select_tokens",
    "set_tiles_per_image",
    "shrink_cu_seqlens",
    "supported_classes",
    "token_scores",
]
