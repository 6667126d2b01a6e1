"""Which model classes IPCV supports, and where each keeps its vision tower.

Adding a family: one module with a ``FamilyAdapter`` subclass, and one ``Family`` line below.
Classes are matched by name so that no family's transformers module is imported until needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .engine import FamilyAdapter
from .internvl import InternVLAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter


@dataclass(frozen=True)
class Family:
    name: str
    tower_classes: tuple[str, ...]
    # Classes wrapping the tower, each with the attribute path from it to the tower.
    wrappers: dict[str, str]
    adapter: type[FamilyAdapter]


FAMILIES: tuple[Family, ...] = (
    Family(
        "Qwen2-VL",
        ("Qwen2VisionTransformerPretrainedModel",),
        {"Qwen2VLForConditionalGeneration": "model.visual", "Qwen2VLModel": "visual"},
        Qwen2VLAdapter,
    ),
    Family(
        "Qwen2.5-VL",
        ("Qwen2_5_VisionTransformerPretrainedModel",),
        {"Qwen2_5_VLForConditionalGeneration": "model.visual", "Qwen2_5_VLModel": "visual"},
        Qwen2_5_VLAdapter,
    ),
    Family(
        "Qwen3-VL",
        ("Qwen3VLVisionModel",),
        {"Qwen3VLForConditionalGeneration": "model.visual", "Qwen3VLModel": "visual"},
        Qwen3VLAdapter,
    ),
    Family(
        "InternVL",
        ("InternVLVisionModel",),
        {"InternVLForConditionalGeneration": "model.vision_tower", "InternVLModel": "vision_tower"},
        InternVLAdapter,
    ),
)


def supported_classes() -> list[str]:
    """Class names ``apply_ipcv`` accepts: each family's full models, base models and towers."""
    return [name for family in FAMILIES for name in (*family.wrappers, *family.tower_classes)]


def find_tower(model: nn.Module) -> tuple[nn.Module, FamilyAdapter]:
    """The vision tower inside ``model`` and its family adapter; ``TypeError`` if unsupported."""
    class_names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        for tower_class in family.tower_classes:
            if tower_class in class_names:
                return model, family.adapter(model)
        for wrapper, path in family.wrappers.items():
            if wrapper in class_names:
                tower = model
                for attribute in path.split("."):
                    tower = getattr(tower, attribute)
                return tower, family.adapter(model)
    families = "; ".join(
        f"{family.name}: {', '.join((*family.wrappers, *family.tower_classes))}" for family in FAMILIES
    )
    raise TypeError(f"model must be of a supported family ({families}), got {type(model).__name__}")
