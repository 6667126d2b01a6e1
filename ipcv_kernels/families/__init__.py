"""The family table, ``FAMILIES``: the one source of truth about every supported model family,
and the look-ups every integration and tool goes through.

Each ``Family`` row (``row.py``) is keyed by a stable id and holds its Hugging Face and vLLM
classes and adapters (and SGLang's), its call kind, FLOP model, tiny test model, real-shape presets and
recommended setting (``table.py``); ``build_tower(id)`` / ``build_model(id)`` build a row's tiny
test models (what the test suite and other libraries' tests use). Classes are matched by name along an instance's class
hierarchy, counting only classes defined by the framework in question (``transformers.*``, ``vllm.*``
or ``sglang.*`` modules), so that no framework module is imported until needed and vLLM's
``Qwen2VLForConditionalGeneration`` never matches transformers' class of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import PATCH_ATTRIBUTE, FamilyAdapter, IPCVPatch
from ..engine.serving import EnginePatching
from ..llm import LLM_PATCH_ATTRIBUTE, LLMPruningPatch
from .row import (
    CALL_KINDS,
    CallKind,
    Family,
    HFClasses,
    ModelUse,
    Preset,
    SGLangClasses,
    TinyModel,
    TinyTower,
    VLLMClasses,
)
from .table import FAMILIES

# Ids of the rows with a tiny tower / a tiny full model (``build_tower`` / ``build_model``).
BUILT_TOWERS = tuple(row.id for row in FAMILIES if row.tiny_tower is not None)
BUILT_FAMILIES = tuple(row.id for row in FAMILIES if row.tiny_model is not None)

HF_MODULE = "transformers."
VLLM_MODULE = "vllm."
SGLANG_MODULE = "sglang."


def family(family_id: str) -> Family:
    """The row of ``family_id``; ``ValueError`` naming the ids otherwise."""
    for row in FAMILIES:
        if row.id == family_id:
            return row
    raise ValueError(f"family must be one of {[row.id for row in FAMILIES]}, got {family_id!r}")


def build_tower(family_id: str, *, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The tiny vision tower of ``family_id`` (one of ``BUILT_TOWERS``) with seeded random weights."""
    if family_id not in BUILT_TOWERS:
        raise ValueError(f"family must be one of {BUILT_TOWERS}, got {family_id!r}")
    return family(family_id).tiny_tower.build(attn=attn, dtype=dtype, seed=seed)


def build_model(
    family_id: str,
    *,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    text_overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """The tiny full model of ``family_id`` (one of ``BUILT_FAMILIES``) with seeded random weights
    (``TinyModel.build``)."""
    if family_id not in BUILT_FAMILIES:
        raise ValueError(f"family must be one of {BUILT_FAMILIES}, got {family_id!r}")
    return family(family_id).tiny_model.build(attn=attn, dtype=dtype, seed=seed, text_overrides=text_overrides)


def presets() -> dict[str, tuple[Family, Preset]]:
    """Every row's real-shape presets by name: ``{name: (row, preset)}``."""
    return {name: (row, preset) for row in FAMILIES for name, preset in row.presets.items()}


def _class_names(model: object, framework_module: str) -> set[str]:
    return {cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith(framework_module)}


def _follow(module: nn.Module, path: str) -> nn.Module:
    for attribute in filter(None, path.split(".")):
        module = getattr(module, attribute)
    return module


def supported_classes() -> list[str]:
    """Class names ``apply_ipcv`` accepts: each family's full models, base models and towers."""
    return [name for row in FAMILIES if row.hf for name in (*row.hf.towers, *row.hf.tower_classes)]


def find_family(model: nn.Module) -> tuple[Family, nn.Module]:
    """``(family, vision tower)`` of a Hugging Face ``model`` (a full model, base model or tower).

    Raises:
        TypeError: unsupported model (the message lists the supported classes).
    """
    names = _class_names(model, HF_MODULE)
    for row in FAMILIES:
        if row.hf is None:
            continue
        if names.intersection(row.hf.tower_classes):
            return row, model
        for wrapper, path in row.hf.towers.items():
            if wrapper in names:
                return row, _follow(model, path)
    listed = "; ".join(
        f"{row.name}: {', '.join((*row.hf.towers, *row.hf.tower_classes))}" for row in FAMILIES if row.hf
    )
    raise TypeError(f"model must be of a supported family ({listed}), got {type(model).__name__}")


def find_tower(model: nn.Module) -> tuple[nn.Module, FamilyAdapter]:
    """The vision tower inside ``model`` and a new adapter of its family; ``TypeError`` if unsupported."""
    row, tower = find_family(model)
    return tower, row.hf.adapter(model)


def _language_model(model: nn.Module, names: set[str]) -> tuple[nn.Module, nn.Module, tuple[int, ...]] | None:
    for row in FAMILIES:
        for holder, path in (row.hf.language_models if row.hf else {}).items():
            if holder in names:
                multimodal = _follow(model, path)
                config = multimodal.config
                # InternVL, Idefics3 and SmolVLM have image tokens only (InternVL gets video frames as images).
                token_ids = tuple(
                    getattr(config, name) for name in ("image_token_id", "video_token_id") if hasattr(config, name)
                )
                return multimodal, getattr(multimodal, row.hf.decoder), token_ids
    return None


def no_language_model(model: nn.Module) -> TypeError:
    """The error for an LLM-side pruner on a model without a language model (a bare tower)."""
    supported = [name for row in FAMILIES if row.hf for name in row.hf.language_models]
    return TypeError(f"llm_pruner needs a model with a language model, one of {supported}; got {type(model).__name__}")


def find_language_model(model: nn.Module) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """``(multimodal model, text model, image / video token ids)`` of a Hugging Face ``model``.

    Raises:
        TypeError: ``model`` is not a supported multimodal model with a language model (a bare
            vision tower has none).
    """
    found = _language_model(model, _class_names(model, HF_MODULE))
    if found is None:
        raise no_language_model(model)
    return found


@dataclass(frozen=True)
class Located:
    """Everything the patching API needs of one Hugging Face model, found in one look-up.

    family: its row. tower: its vision tower. multimodal, text_model, token_ids: the model whose
    forward receives ``input_ids``, its decoder and its image / video token ids (``None`` / ``()``
    for a bare tower).
    """

    family: Family
    tower: nn.Module
    multimodal: nn.Module | None
    text_model: nn.Module | None
    token_ids: tuple[int, ...]

    @property
    def ipcv_patch(self) -> IPCVPatch | None:
        """The IPCV patch installed on the tower, if any."""
        return vars(self.tower).get(PATCH_ATTRIBUTE)

    @property
    def llm_patch(self) -> LLMPruningPatch | None:
        """The LLM-side patch installed on the decoder, if any."""
        return None if self.text_model is None else vars(self.text_model).get(LLM_PATCH_ATTRIBUTE)


def locate(model: nn.Module) -> Located:
    """``model``'s row, tower and language model (``find_family`` and ``find_language_model`` at once).

    Raises:
        TypeError: unsupported model (the message lists the supported classes).
    """
    row, tower = find_family(model)
    multimodal, text_model, token_ids = _language_model(model, _class_names(model, HF_MODULE)) or (None, None, ())
    return Located(row, tower, multimodal, text_model, token_ids)


def recommended_config(model: nn.Module, **overrides: Any) -> IPCVConfig:
    """The recommended ``IPCVConfig`` for ``model``'s family (Hugging Face, vLLM or SGLang model), with
    ``overrides`` applied. ``Family.recommended_source`` says where each number comes from.

    Raises:
        TypeError: unsupported model, or an override that is not an ``IPCVConfig`` field.
        ValueError: an override out of range (the message names the field).
    """
    if is_vllm_model(model):
        row, _ = find_vllm_family(model)
    elif is_sglang_model(model):
        row, _ = find_sglang_family(model)
    else:
        row, _ = find_family(model)
    return IPCVConfig(**{**row.recommended, **overrides})


def is_vllm_model(model: object) -> bool:
    """Whether ``model``'s class derives from a class defined by vLLM."""
    return isinstance(model, nn.Module) and bool(_class_names(model, VLLM_MODULE))


def find_vllm_family(model: nn.Module) -> tuple[Family, nn.Module]:
    """``(family, vision tower)`` of a vLLM model; ``TypeError`` listing the supported classes.

    The most derived vLLM class of ``model`` that a row names decides (vLLM's SmolVLM class
    derives from its Idefics3 class)."""
    for model_class in type(model).__mro__:
        if not model_class.__module__.startswith(VLLM_MODULE):
            continue
        for row in FAMILIES:
            path = row.vllm.towers.get(model_class.__name__) if row.vllm else None
            if path is not None:
                return row, _follow(model, path)
    supported = ", ".join(cls for row in FAMILIES if row.vllm for cls in row.vllm.towers)
    raise TypeError(f"model must be a vLLM model of a supported family ({supported}), got {type(model).__name__}")


def vllm_ipcv_patch(model: nn.Module) -> IPCVPatch | None:
    """The installed patch of a vLLM model's tower; ``None`` when unpatched or unsupported."""
    return VLLM_PATCHING.installed(model)


def is_sglang_model(model: object) -> bool:
    """Whether ``model``'s class derives from a class defined by SGLang. Not necessarily an
    ``nn.Module``: SGLang's MiniCPM-V classes are plain wrappers that build the model of the
    checkpoint's version as ``minicpmv`` and hand every attribute on to it."""
    return bool(_class_names(model, SGLANG_MODULE))


def find_sglang_family(model: nn.Module) -> tuple[Family, nn.Module]:
    """``(family, vision tower)`` of an SGLang model; ``TypeError`` listing the supported classes.

    The most derived SGLang class of ``model`` that a row names decides (SGLang's Qwen3.5 classes
    derive from its Qwen3-VL class)."""
    for model_class in type(model).__mro__:
        if not model_class.__module__.startswith(SGLANG_MODULE):
            continue
        for row in FAMILIES:
            path = row.sglang.towers.get(model_class.__name__) if row.sglang else None
            if path is not None:
                return row, _follow(model, path)
    supported = ", ".join(cls for row in FAMILIES if row.sglang for cls in row.sglang.towers)
    raise TypeError(f"model must be an SGLang model of a supported family ({supported}), got {type(model).__name__}")


def sglang_ipcv_patch(model: nn.Module) -> IPCVPatch | None:
    """The installed patch of an SGLang model's tower; ``None`` when unpatched or unsupported."""
    return SGLANG_PATCHING.installed(model)


# How the vLLM and SGLang plugins patch their models (``apply_ipcv`` / ``remove_ipcv``): one code
# path, each engine's family look-up.
VLLM_PATCHING = EnginePatching(find_vllm_family, "vllm", recommended_config)
SGLANG_PATCHING = EnginePatching(find_sglang_family, "sglang", recommended_config)


__all__ = [
    "BUILT_FAMILIES",
    "BUILT_TOWERS",
    "CALL_KINDS",
    "FAMILIES",
    "SGLANG_PATCHING",
    "VLLM_PATCHING",
    "CallKind",
    "Family",
    "HFClasses",
    "Located",
    "ModelUse",
    "Preset",
    "SGLangClasses",
    "TinyModel",
    "TinyTower",
    "VLLMClasses",
    "build_model",
    "build_tower",
    "family",
    "find_family",
    "find_language_model",
    "find_sglang_family",
    "find_tower",
    "find_vllm_family",
    "is_sglang_model",
    "is_vllm_model",
    "locate",
    "no_language_model",
    "presets",
    "recommended_config",
    "sglang_ipcv_patch",
    "supported_classes",
    "vllm_ipcv_patch",
]
