"""Which model classes IPCV supports, and where each keeps its vision tower.

Adding a family: one module with a ``FamilyAdapter`` subclass, and one ``Family`` line below.
Classes are matched by name so that no family's transformers module is imported until needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .engine import FamilyAdapter
from .qwen2_vl import Qwen2VLAdapter


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
)


def supported_classes() -> list[str]:
    return [name for family in FAMILIES for name in (*family.wrappers, *family.tower_classes)]


def find_tower(model: nn.Module) -> tuple[nn.Module, FamilyAdapter]:
    """The vision tower inside ``model`` and its family adapter; ``TypeError`` if unsupported."""
    class_names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        for tower_class in family.tower_classes:
            if tower_class in class_names:
                return model, family.adapter()
        for wrapper, path in family.wrappers.items():
            if wrapper in class_names:
                tower = model
                for attribute in path.split("."):
                    tower = getattr(tower, attribute)
                return tower, family.adapter()
    raise TypeError(f"model must be one of the supported classes {supported_classes()}, got {type(model).__name__}")
