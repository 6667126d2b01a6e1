"""Patching a serving engine's model instance (vLLM, SGLang): what both plugins' ``apply_ipcv`` /
``remove_ipcv`` do, given how each engine finds a model's family row and vision tower.

The engines differ only in that look-up (``families.find_vllm_family`` /
``find_sglang_family``) and in which of a row's fields names their classes (``vllm``,
``sglang``); everything else — the setting's default and check, the patch validated before the
model is touched, a previous patch replaced — is one code path, ``EnginePatching``. The
instances live beside the look-ups (``families.VLLM_PATCHING``, ``families.SGLANG_PATCHING``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import IPCVConfig
from .vision import PATCH_ATTRIBUTE, IPCVPatch

# ``model -> (family row, vision tower)``; raises ``TypeError`` for a model of no supported family.
Locate = Callable[[nn.Module], tuple[Any, Any]]


@dataclass(frozen=True)
class EnginePatching:
    """How IPCV patches one serving engine's models.

    locate: the engine's look-up of a model's row and vision tower.
    classes: the row's field holding the engine's classes (``"vllm"``, ``"sglang"``), whose
        ``adapter_class()`` builds the tower's adapter.
    recommended: ``model -> IPCVConfig``, the family's recommended setting.
    """

    locate: Locate
    classes: str
    recommended: Callable[[nn.Module], IPCVConfig]

    def apply(self, model: nn.Module, config: IPCVConfig | None = None) -> IPCVPatch:
        """Patch ``model``'s vision tower with IPCV, replacing a previous patch; return the patch.
        ``config=None`` takes the family's recommended setting.

        Raises:
            TypeError: unsupported model (``locate``'s), one built without its vision tower (e.g.
                SGLang's ``--language-only``), or ``config`` not an ``IPCVConfig``.
            ValueError: ``config.prune_layer`` outside ``[1, depth)`` of the tower, or what the
                adapter refuses (a CUDA-graphed tower, ...).
        """
        row, tower = self.locate(model)
        if not isinstance(tower, nn.Module):
            raise TypeError(f"{type(model).__name__} was built without its vision tower: IPCV has nothing to patch")
        config = self.recommended(model) if config is None else config
        if not isinstance(config, IPCVConfig):
            raise TypeError(f"config must be an IPCVConfig, got {type(config).__name__}")
        adapter = getattr(row, self.classes).adapter_class()(model)
        patch = IPCVPatch(tower, adapter, config)  # validates before touching the model
        self.remove(model)
        patch.install()
        return patch

    def installed(self, model: nn.Module) -> IPCVPatch | None:
        """The patch installed on ``model``'s vision tower; ``None`` when unpatched, unsupported
        or built without its tower."""
        try:
            _, tower = self.locate(model)
        except (TypeError, AttributeError):
            return None
        return vars(tower).get(PATCH_ATTRIBUTE) if isinstance(tower, nn.Module) else None

    def remove(self, model: nn.Module) -> nn.Module:
        """Undo ``apply`` on ``model`` (a no-op when unpatched); return it."""
        patch = self.installed(model)
        if patch is not None:
            patch.remove()
        return model
