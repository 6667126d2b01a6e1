"""Where each supported multimodal model keeps its language model, and which tokens are visual.

``Qwen2VLForConditionalGeneration.model`` is a ``Qwen2VLModel``; its ``language_model`` is the
``Qwen2VLTextModel`` whose ``layers`` the patch wraps. The multimodal model computes the 3-D
rotary positions (``get_rope_index``, ``rope_deltas``) from the full sequence before the text
model runs, so pruning never changes a position. Qwen2.5-VL's decoder has the same structure;
Qwen3-VL's adds DeepStack (vision features added to the visual tokens' hidden states after the
first decoder layers), which the patch maps onto the kept tokens. InternVL's language model
(``InternVLModel.language_model``, a Qwen2 / Llama decoder) uses 1-D rotary positions, which also
come from the full sequence (the cache length of layer 0, which holds every token).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LanguageModelFamily:
    name: str
    # Classes that hold a language model, each with the attribute path from it to the
    # multimodal model whose forward receives ``input_ids`` ("" for the class itself).
    wrappers: dict[str, str]


QWEN2_VL = LanguageModelFamily("Qwen2-VL", {"Qwen2VLForConditionalGeneration": "model", "Qwen2VLModel": ""})
QWEN2_5_VL = LanguageModelFamily("Qwen2.5-VL", {"Qwen2_5_VLForConditionalGeneration": "model", "Qwen2_5_VLModel": ""})
QWEN3_VL = LanguageModelFamily("Qwen3-VL", {"Qwen3VLForConditionalGeneration": "model", "Qwen3VLModel": ""})
INTERNVL = LanguageModelFamily("InternVL", {"InternVLForConditionalGeneration": "model", "InternVLModel": ""})
LANGUAGE_MODEL_FAMILIES: tuple[LanguageModelFamily, ...] = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, INTERNVL)


def find_language_model(model: nn.Module) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """``(multimodal model, text model, image / video token ids)`` of ``model``.

    Raises:
        TypeError: ``model`` is not a supported multimodal model with a language model (a bare
            vision tower has none).
    """
    class_names = {cls.__name__ for cls in type(model).__mro__}
    for family in LANGUAGE_MODEL_FAMILIES:
        for wrapper, path in family.wrappers.items():
            if wrapper in class_names:
                multimodal = model
                for attribute in filter(None, path.split(".")):
                    multimodal = getattr(multimodal, attribute)
                config = multimodal.config
                # InternVL has image tokens only (video frames arrive as images).
                token_ids = tuple(
                    getattr(config, name) for name in ("image_token_id", "video_token_id") if hasattr(config, name)
                )
                return multimodal, multimodal.language_model, token_ids
    supported = [name for family in LANGUAGE_MODEL_FAMILIES for name in family.wrappers]
    raise TypeError(f"llm_pruner needs a model with a language model, one of {supported}; got {type(model).__name__}")
