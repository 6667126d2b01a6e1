"""The vLLM family table: vLLM's own multimodal model classes, their vision towers and adapters.

Beside (not inside) the Hugging Face table, ``ipcv_kernels.models.families``: classes are matched
by name along the instance's class hierarchy, counting only classes defined in ``vllm.*`` modules
(vLLM's ``Qwen2VLForConditionalGeneration`` has the tower at ``.visual``, transformers' at
``.model.visual``; the two tables never match each other's classes). Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..engine import PATCH_ATTRIBUTE, FamilyAdapter, IPCVPatch
from .adapters import (
    VLLMInternVLAdapter,
    VLLMInternVLChatAdapter,
    VLLMQwen2_5_VLAdapter,
    VLLMQwen2VLAdapter,
    VLLMQwen3VLAdapter,
)

FRAMEWORK_MODULE = "vllm."


@dataclass(frozen=True)
class VLLMFamily:
    """One vLLM model family.

    name: shown in messages and docs.
    adapter: its ``FamilyAdapter`` subclass.
    architectures: vLLM model-registry names (``config.json``'s ``architectures``) whose class
        the plugin extends, each with the vLLM module defining that class (``module:Class``
        where vLLM's class has another name than the architecture).
    towers: model classes, each with the attribute path from it to the vision tower.
    recommended: ``IPCVConfig`` fields recommended for the family (others take the defaults).
    """

    name: str
    adapter: type[FamilyAdapter]
    architectures: dict[str, str]
    towers: dict[str, str]
    recommended: dict[str, Any] = field(default_factory=dict)


# The paper's InternVL2 setting (as the Hugging Face family table's).
INTERNVL_RECOMMENDED = dict(prune_layer=7, ratio=0.65, as_layers=3, num_neighbors=10)

VLLM_FAMILIES: tuple[VLLMFamily, ...] = (
    VLLMFamily(
        "Qwen2-VL",
        VLLMQwen2VLAdapter,
        {"Qwen2VLForConditionalGeneration": "vllm.model_executor.models.qwen2_vl"},
        {"Qwen2VLForConditionalGeneration": "visual"},
    ),
    VLLMFamily(
        "Qwen2.5-VL",
        VLLMQwen2_5_VLAdapter,
        {"Qwen2_5_VLForConditionalGeneration": "vllm.model_executor.models.qwen2_5_vl"},
        {"Qwen2_5_VLForConditionalGeneration": "visual"},
    ),
    VLLMFamily(
        "Qwen3-VL",
        VLLMQwen3VLAdapter,
        {"Qwen3VLForConditionalGeneration": "vllm.model_executor.models.qwen3_vl"},
        {"Qwen3VLForConditionalGeneration": "visual"},
    ),
    VLLMFamily(
        "InternVL",
        VLLMInternVLAdapter,
        # transformers' native InternVL format: vLLM builds its InternS1 class for it.
        {"InternVLForConditionalGeneration": "vllm.model_executor.models.interns1:InternS1ForConditionalGeneration"},
        {"InternS1ForConditionalGeneration": "vision_tower"},
        recommended=INTERNVL_RECOMMENDED,
    ),
    VLLMFamily(
        "InternVL-Chat",
        VLLMInternVLChatAdapter,
        # The OpenGVLab checkpoints' own format (``trust_remote_code``).
        {"InternVLChatModel": "vllm.model_executor.models.internvl"},
        {"InternVLChatModel": "vision_model"},
        recommended=INTERNVL_RECOMMENDED,
    ),
)


def _framework_class_names(model: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith(FRAMEWORK_MODULE)}


def is_vllm_model(model: object) -> bool:
    """Whether ``model``'s class derives from a class defined by vLLM."""
    return isinstance(model, nn.Module) and bool(_framework_class_names(model))


def find_vllm_family(model: nn.Module) -> tuple[VLLMFamily, nn.Module]:
    """``(family, vision tower)`` of a vLLM model; ``TypeError`` listing the supported classes."""
    names = _framework_class_names(model)
    for family in VLLM_FAMILIES:
        for cls, path in family.towers.items():
            if cls in names:
                tower = model
                for attribute in path.split("."):
                    tower = getattr(tower, attribute)
                return family, tower
    supported = ", ".join(cls for family in VLLM_FAMILIES for cls in family.towers)
    raise TypeError(f"model must be a vLLM model of a supported family ({supported}), got {type(model).__name__}")


def vllm_ipcv_patch(model: nn.Module) -> IPCVPatch | None:
    """The installed patch of a vLLM model's tower; ``None`` when unpatched or unsupported."""
    try:
        _, tower = find_vllm_family(model)
    except (TypeError, AttributeError):
        return None
    return vars(tower).get(PATCH_ATTRIBUTE)
