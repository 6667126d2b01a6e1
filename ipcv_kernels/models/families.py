"""The family table: every supported Hugging Face multimodal family, its vision tower and its
language model, and the settings recommended for it.

Adding a family: one adapter module (a ``FamilyAdapter`` subclass, see ``ipcv_kernels.engine``)
and one ``Family`` entry below. Classes are matched by name along the instance's class hierarchy,
and only classes defined by transformers count (``transformers.*`` modules), so that no family's
transformers module is imported until needed and another framework's class of the same name
(vLLM also has a ``Qwen2VLForConditionalGeneration``) never matches a Hugging Face family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import IPCVConfig
from ..engine import FamilyAdapter
from .clip_vit import ClipViTAdapter
from .idefics3 import Idefics3Adapter
from .internvl import InternVLAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

FRAMEWORK_MODULE = "transformers."
# The paper reports no setting for the CLIP / SigLIP families (LLaVA, Gemma 3, PaliGemma, Idefics3,
# SmolVLM): they get IPCVConfig's defaults (the paper's Qwen2-VL-7B setting), to be checked per
# checkpoint with `python -m ipcv_kernels fidelity`.
UNTUNED = "IPCVConfig's defaults, untuned for this family (the paper gives none): check with `ipcv_kernels fidelity`"


@dataclass(frozen=True)
class Family:
    """One model family.

    name: shown in messages and docs.
    adapter: its ``FamilyAdapter`` subclass.
    tower_classes: the vision tower classes.
    towers: classes wrapping the tower, each with the attribute path from it to the tower.
    language_models: classes holding a language model, each with the attribute path from it to
        the multimodal model whose forward receives ``input_ids`` (``""``: the class itself).
    decoder: the attribute of that multimodal model holding the decoder an LLM-side pruner
        patches (``layers``, ``norm``; Idefics3 and SmolVLM name it ``text_model``).
    recommended: ``IPCVConfig`` fields recommended for the family (others take the defaults).
    recommended_source: where those numbers come from.
    """

    name: str
    adapter: type[FamilyAdapter]
    tower_classes: tuple[str, ...]
    towers: dict[str, str]
    language_models: dict[str, str]
    decoder: str = "language_model"
    recommended: dict[str, Any] = field(default_factory=dict)
    recommended_source: str = "IPCVConfig's defaults: the paper's Qwen2-VL-7B setting (P=3, r=0.65, A=7, k=10)"


FAMILIES: tuple[Family, ...] = (
    Family(
        "Qwen2-VL",
        Qwen2VLAdapter,
        ("Qwen2VisionTransformerPretrainedModel",),
        {"Qwen2VLForConditionalGeneration": "model.visual", "Qwen2VLModel": "visual"},
        {"Qwen2VLForConditionalGeneration": "model", "Qwen2VLModel": ""},
    ),
    Family(
        "Qwen2.5-VL",
        Qwen2_5_VLAdapter,
        ("Qwen2_5_VisionTransformerPretrainedModel",),
        {"Qwen2_5_VLForConditionalGeneration": "model.visual", "Qwen2_5_VLModel": "visual"},
        {"Qwen2_5_VLForConditionalGeneration": "model", "Qwen2_5_VLModel": ""},
    ),
    Family(
        "Qwen3-VL",
        Qwen3VLAdapter,
        ("Qwen3VLVisionModel",),
        {"Qwen3VLForConditionalGeneration": "model.visual", "Qwen3VLModel": "visual"},
        {"Qwen3VLForConditionalGeneration": "model", "Qwen3VLModel": ""},
    ),
    Family(
        "InternVL",
        InternVLAdapter,
        ("InternVLVisionModel",),
        {"InternVLForConditionalGeneration": "model.vision_tower", "InternVLModel": "vision_tower"},
        {"InternVLForConditionalGeneration": "model", "InternVLModel": ""},
        recommended=dict(prune_layer=7, ratio=0.65, as_layers=3, num_neighbors=10),
        recommended_source="the paper's InternVL2 setting (P=7, r=0.65, A=3, k=10)",
    ),
    Family(
        "LLaVA 1.5",
        ClipViTAdapter,
        (),
        {"LlavaForConditionalGeneration": "model.vision_tower", "LlavaModel": "vision_tower"},
        {"LlavaForConditionalGeneration": "model", "LlavaModel": ""},
        recommended_source=UNTUNED,
    ),
    Family(
        "LLaVA-NeXT",
        ClipViTAdapter,
        (),
        {"LlavaNextForConditionalGeneration": "model.vision_tower", "LlavaNextModel": "vision_tower"},
        {"LlavaNextForConditionalGeneration": "model", "LlavaNextModel": ""},
        recommended_source=UNTUNED,
    ),
    Family(
        "LLaVA-OneVision",
        ClipViTAdapter,
        (),
        {"LlavaOnevisionForConditionalGeneration": "model.vision_tower", "LlavaOnevisionModel": "vision_tower"},
        {"LlavaOnevisionForConditionalGeneration": "model", "LlavaOnevisionModel": ""},
        recommended_source=UNTUNED,
    ),
    Family(
        "Gemma 3",
        ClipViTAdapter,
        (),
        {"Gemma3ForConditionalGeneration": "model.vision_tower", "Gemma3Model": "vision_tower"},
        {"Gemma3ForConditionalGeneration": "model", "Gemma3Model": ""},
        recommended_source=UNTUNED,
    ),
    Family(
        "PaliGemma",
        ClipViTAdapter,
        (),
        {"PaliGemmaForConditionalGeneration": "model.vision_tower", "PaliGemmaModel": "vision_tower"},
        {"PaliGemmaForConditionalGeneration": "model", "PaliGemmaModel": ""},
        recommended_source=UNTUNED,
    ),
    Family(
        "Idefics3",
        Idefics3Adapter,
        ("Idefics3VisionTransformer",),
        {"Idefics3ForConditionalGeneration": "model.vision_model", "Idefics3Model": "vision_model"},
        {"Idefics3ForConditionalGeneration": "model", "Idefics3Model": ""},
        decoder="text_model",
        recommended_source=UNTUNED,
    ),
    Family(
        "SmolVLM",
        Idefics3Adapter,
        ("SmolVLMVisionTransformer",),
        {"SmolVLMForConditionalGeneration": "model.vision_model", "SmolVLMModel": "vision_model"},
        {"SmolVLMForConditionalGeneration": "model", "SmolVLMModel": ""},
        decoder="text_model",
        recommended_source=UNTUNED,
    ),
    # Bare towers last: a full model above names its own tower.
    Family("CLIP", ClipViTAdapter, ("CLIPVisionModel",), {}, {}, recommended_source=UNTUNED),
    Family("SigLIP", ClipViTAdapter, ("SiglipVisionModel",), {}, {}, recommended_source=UNTUNED),
)


def _framework_class_names(model: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith(FRAMEWORK_MODULE)}


def _follow(module: nn.Module, path: str) -> nn.Module:
    for attribute in filter(None, path.split(".")):
        module = getattr(module, attribute)
    return module


def _unsupported(model: nn.Module, what: str) -> TypeError:
    families = "; ".join(f"{family.name}: {', '.join((*family.towers, *family.tower_classes))}" for family in FAMILIES)
    return TypeError(f"{what} must be of a supported family ({families}), got {type(model).__name__}")


def find_family(model: nn.Module) -> tuple[Family, nn.Module]:
    """``(family, vision tower)`` of ``model`` (a full model, base model or bare tower).

    Raises:
        TypeError: unsupported model (the message lists the supported classes).
    """
    names = _framework_class_names(model)
    for family in FAMILIES:
        if names.intersection(family.tower_classes):
            return family, model
        for wrapper, path in family.towers.items():
            if wrapper in names:
                return family, _follow(model, path)
    raise _unsupported(model, "model")


def find_tower(model: nn.Module) -> tuple[nn.Module, FamilyAdapter]:
    """The vision tower inside ``model`` and a new adapter of its family; ``TypeError`` if unsupported."""
    family, tower = find_family(model)
    return tower, family.adapter(model)


def find_language_model(model: nn.Module) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """``(multimodal model, text model, image / video token ids)`` of ``model``.

    Raises:
        TypeError: ``model`` is not a supported multimodal model with a language model (a bare
            vision tower has none).
    """
    names = _framework_class_names(model)
    for family in FAMILIES:
        for holder, path in family.language_models.items():
            if holder in names:
                multimodal = _follow(model, path)
                config = multimodal.config
                # InternVL, Idefics3 and SmolVLM have image tokens only (InternVL gets video frames as images).
                token_ids = tuple(
                    getattr(config, name) for name in ("image_token_id", "video_token_id") if hasattr(config, name)
                )
                return multimodal, getattr(multimodal, family.decoder), token_ids
    supported = [name for family in FAMILIES for name in family.language_models]
    raise TypeError(f"llm_pruner needs a model with a language model, one of {supported}; got {type(model).__name__}")


def supported_classes() -> list[str]:
    """Class names ``apply_ipcv`` accepts: each family's full models, base models and towers."""
    return [name for family in FAMILIES for name in (*family.towers, *family.tower_classes)]


def recommended_config(model: nn.Module, **overrides: Any) -> IPCVConfig:
    """The recommended ``IPCVConfig`` for ``model``'s family, with ``overrides`` applied.

    InternVL: prune layer 7, ratio 0.65, 3 stabilisation blocks, 10 neighbours (the paper's
    InternVL2 setting); the Qwen families: ``IPCVConfig()`` (the paper's Qwen2-VL-7B setting).
    ``Family.recommended_source`` says where each number comes from.

    Raises:
        TypeError: unsupported model, or an override that is not an ``IPCVConfig`` field.
    """
    family, _ = find_family(model)
    return IPCVConfig(**{**family.recommended, **overrides})
