"""vLLM model classes with IPCV: each is the vLLM class of its architecture, extended by a
constructor that patches the instance's vision tower when the model config asks for it.

The plugin (``ipcv_kernels.vllm.register``) registers them lazily by name (``module:class``) in
vLLM's model registry, so a class is only created, and its vLLM module only imported, when vLLM
builds a model of that architecture. Each keeps the name of the vLLM class it extends.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from torch import nn

from ..families import FAMILIES


def _with_ipcv(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` with a constructor that applies ``hf_config.ipcv`` (see ``settings_from_config``)."""
    from .plugin import apply_from_config

    def __init__(self: nn.Module, *, vllm_config: Any, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        # Before any weight is loaded: the patch wraps forwards only, and vLLM's memory
        # profiling run already goes through it.
        apply_from_config(self, vllm_config)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__, "__doc__": base.__doc__})


@functools.cache
def __getattr__(name: str) -> type[nn.Module]:
    for family in FAMILIES:
        if family.vllm is not None and name in family.vllm.architectures:
            module, _, vllm_class = family.vllm.architectures[name].partition(":")
            return _with_ipcv(getattr(importlib.import_module(module), vllm_class or name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
