"""The family table: one ``Family`` row per supported model family (see ``row.py`` for the fields).

Rows are matched in order: full models first, bare towers (CLIP, SigLIP) last, since a full model
above names its own tower. Adding a family: its adapter (``ipcv_kernels/models/<family>.py``, and
``ipcv_kernels/vllm/adapters.py`` for vLLM, ``ipcv_kernels/sglang/adapters.py`` for SGLang), one row here, and its paragraph in ``docs/spec.md``
(``docs/adding_a_family.md``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .. import flops
from ..models.clip_vit import ClipViTAdapter
from ..models.gemma4 import Gemma4Adapter
from ..models.glm4v import Glm4vAdapter
from ..models.idefics3 import Idefics3Adapter
from ..models.internvl import InternVLAdapter
from ..models.kimi_k25 import KimiK25Adapter
from ..models.llama4 import Llama4Adapter
from ..models.llava_onevision1_5 import LlavaOnevision15Adapter
from ..models.minicpmv import MiniCPMVAdapter
from ..models.pixtral import PixtralAdapter
from ..models.qwen2_5_vl import Qwen2_5_VLAdapter
from ..models.qwen2_vl import Qwen2VLAdapter
from ..models.qwen3_5 import Qwen3_5Adapter
from ..models.qwen3_vl import Qwen3VLAdapter
from ..testing import models as tiny
from ..testing import processors
from . import shapes
from .row import (
    CROPS,
    FRAMES,
    GRID,
    GRID_CLS,
    IMAGES,
    PATCHES,
    SLICES,
    SUB_IMAGES,
    TILES,
    WINDOWS,
    Family,
    HFClasses,
    ModelUse,
    Preset,
    SGLangClasses,
    TinyModel,
    TinyTower,
    VLLMClasses,
)

# The paper reports no setting for the CLIP / SigLIP families (LLaVA, Gemma 3, PaliGemma, Idefics3,
# SmolVLM): they get IPCVConfig's defaults (the paper's Qwen2-VL-7B setting), to be checked per
# checkpoint with `python -m ipcv_kernels fidelity`.
UNTUNED = "IPCVConfig's defaults, untuned for this family (the paper gives none): check with `ipcv_kernels fidelity`"
INTERNVL_RECOMMENDED: dict[str, Any] = dict(prune_layer=7, ratio=0.65, as_layers=3, num_neighbors=10)
INTERNVL_SOURCE = "the paper's InternVL2 setting (P=7, r=0.65, A=3, k=10)"
# Gemma 4's decoder hands every layer a per-layer token embedding (PLE) and lets later layers reuse
# earlier layers' keys and values (``num_kv_shared_layers``): an LLM-side pruner would have to cut
# both to the kept tokens, which it does not.
GEMMA4_LLM_REFUSAL = (
    "its decoder layers take per-layer token embeddings (per_layer_input) and share key/value states "
    "across layers (num_kv_shared_layers), which FastV / DART do not prune"
)
KIMI_K25_LLM_REFUSAL = (
    "its DeepSeek-V3 decoder uses multi-head latent attention, without the per-head q_proj / k_proj "
    "FastV / DART score tokens with"
)
# MiniCPM-V: IPCV applies after the in-tower 2 x 2 merge (spec §5.14), from block insert_layer_id + 2
# = 8 on; the rest IPCVConfig's defaults.
MINICPMV_RECOMMENDED: dict[str, Any] = dict(prune_layer=8, ratio=0.65, as_layers=2, num_neighbors=10)
MINICPMV_SOURCE = (
    "untuned (the paper gives none): the first prune layer after MiniCPM-V's in-tower merge "
    "(insert_layer_id + 2 = 8), IPCVConfig's ratio and k, 2 stabilisation blocks; check with `ipcv_kernels fidelity`"
)
# Llama 4's decoder is a MoE whose layers interleave chunked-attention layers with rotary and
# global-attention layers without it (NoPE) and scale the latter's queries by position
# (attn_temperature_tuning): FastV / DART's scores and cuts assume neither.
LLAMA4_LLM_REFUSAL = (
    "its MoE decoder interleaves chunked-attention layers with rotary and global layers without rotary "
    "(NoPE) whose queries are scaled by position (attn_temperature_tuning), which FastV / DART do not handle"
)
VLLM_ADAPTERS = "ipcv_kernels.vllm.adapters"
SGLANG_ADAPTERS = "ipcv_kernels.sglang.adapters"


def _hf(adapter: type, prefix: str, tower: str, tower_classes: tuple[str, ...] = (), **kwargs: Any) -> HFClasses:
    """The usual transformers layout: ``<prefix>ForConditionalGeneration`` holding ``<prefix>Model``
    at ``.model``, which holds the tower at ``.<tower>`` and the language model."""
    full, base = f"{prefix}ForConditionalGeneration", f"{prefix}Model"
    return HFClasses(
        adapter,
        tower_classes,
        {full: f"model.{tower}", base: tower},
        {full: "model", base: ""},
        **kwargs,
    )


def _qwen_vllm(adapter: str, architecture: str, module: str) -> VLLMClasses:
    return VLLMClasses(
        f"{VLLM_ADAPTERS}:{adapter}", {architecture: f"vllm.model_executor.models.{module}"}, {architecture: "visual"}
    )


def _clip_vllm(adapter: str, architecture: str, module: str) -> VLLMClasses:
    """A CLIP / SigLIP family in vLLM: its tower at ``vision_tower``."""
    return VLLMClasses(
        f"{VLLM_ADAPTERS}:{adapter}",
        {architecture: f"vllm.model_executor.models.{module}"},
        {architecture: "vision_tower"},
    )


def _qwen_sglang(adapter: str, model_class: str) -> SGLangClasses:
    return SGLangClasses(f"{SGLANG_ADAPTERS}:{adapter}", {model_class: "visual"})


FAMILIES: tuple[Family, ...] = (
    Family(
        "qwen2_vl",
        "Qwen2-VL",
        GRID,
        flops.qwen2_vl_flops,
        hf=_hf(Qwen2VLAdapter, "Qwen2VL", "visual", ("Qwen2VisionTransformerPretrainedModel",)),
        vllm=_qwen_vllm("VLLMQwen2VLAdapter", "Qwen2VLForConditionalGeneration", "qwen2_vl"),
        sglang=_qwen_sglang("SGLangQwen2VLAdapter", "Qwen2VLForConditionalGeneration"),
        tiny_tower=TinyTower(
            "qwen2_vl.modeling_qwen2_vl",
            "Qwen2VLVisionConfig",
            "Qwen2VisionTransformerPretrainedModel",
            tiny.TINY_VISION,
        ),
        tiny_model=TinyModel(
            "Qwen2VLConfig",
            "Qwen2VLForConditionalGeneration",
            tiny.qwen2_vl_fields,
            tiny.qwen_prompt,
            processors.qwen_processor,
        ),
        image_processor=tiny.qwen_image_processor,
        presets={
            "qwen2-vl-7b": Preset(shapes.QWEN2_VL_7B_VISION),
            "qwen2-vl-7b-d8": Preset({**shapes.QWEN2_VL_7B_VISION, "depth": 8}),
            "qwen2-vl-2b": Preset({**shapes.QWEN2_VL_7B_VISION, "hidden_size": 1536}),
            # The demo's built-in tower: 12 blocks of width 640 (10 heads of 64).
            "qwen2-vl-demo": Preset(
                {**shapes.QWEN2_VL_7B_VISION, "depth": 12, "embed_dim": 640, "num_heads": 10, "hidden_size": 1024}
            ),
            # Smoke runs: the 14-pixel patches kept, so image sizes mean the real token counts.
            "qwen2-vl-tiny": Preset(
                {
                    **shapes.QWEN2_VL_7B_VISION,
                    "depth": 4,
                    "embed_dim": 64,
                    "num_heads": 4,
                    "mlp_ratio": 2,
                    "hidden_size": 48,
                }
            ),
        },
    ),
    Family(
        "qwen2_5_vl",
        "Qwen2.5-VL",
        WINDOWS,
        flops.qwen2_5_vl_flops,
        hf=_hf(Qwen2_5_VLAdapter, "Qwen2_5_VL", "visual", ("Qwen2_5_VisionTransformerPretrainedModel",)),
        vllm=_qwen_vllm("VLLMQwen2_5_VLAdapter", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
        sglang=_qwen_sglang("SGLangQwen2_5_VLAdapter", "Qwen2_5_VLForConditionalGeneration"),
        tiny_tower=TinyTower(
            "qwen2_5_vl.modeling_qwen2_5_vl",
            "Qwen2_5_VLVisionConfig",
            "Qwen2_5_VisionTransformerPretrainedModel",
            tiny.QWEN2_5_VISION,
        ),
        tiny_model=TinyModel(
            "Qwen2_5_VLConfig",
            "Qwen2_5_VLForConditionalGeneration",
            tiny.qwen2_5_vl_fields,
            tiny.qwen_prompt,
            processors.qwen_processor,
        ),
        image_processor=tiny.qwen_image_processor,
        presets={"qwen2.5-vl-7b": Preset(shapes.QWEN2_5_VL_7B_VISION)},
    ),
    Family(
        "qwen3_vl",
        "Qwen3-VL",
        GRID,
        flops.qwen3_vl_flops,
        hf=_hf(Qwen3VLAdapter, "Qwen3VL", "visual", ("Qwen3VLVisionModel",)),
        vllm=_qwen_vllm("VLLMQwen3VLAdapter", "Qwen3VLForConditionalGeneration", "qwen3_vl"),
        sglang=_qwen_sglang("SGLangQwen3VLAdapter", "Qwen3VLForConditionalGeneration"),
        tiny_tower=TinyTower(
            "qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionConfig", "Qwen3VLVisionModel", tiny.QWEN3_VISION
        ),
        tiny_model=TinyModel(
            "Qwen3VLConfig",
            "Qwen3VLForConditionalGeneration",
            tiny.qwen3_vl_fields,
            tiny.qwen_prompt,
            processors.qwen_processor,
        ),
        image_processor=tiny.qwen_image_processor,
        presets={
            "qwen3-vl-8b": Preset(shapes.QWEN3_VL_8B_VISION),
            "qwen3-vl-8b-d8": Preset({**shapes.QWEN3_VL_8B_VISION, "depth": 8, "deepstack_visual_indexes": [2, 4, 6]}),
        },
    ),
    Family(
        "internvl",
        "InternVL",
        TILES,
        flops.internvl_flops,
        hf=_hf(InternVLAdapter, "InternVL", "vision_tower", ("InternVLVisionModel",)),
        # transformers' native InternVL format: vLLM builds its InternS1 class for it.
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMInternVLAdapter",
            {
                "InternVLForConditionalGeneration": "vllm.model_executor.models.interns1:InternS1ForConditionalGeneration"
            },
            {"InternS1ForConditionalGeneration": "vision_tower"},
        ),
        tiny_tower=TinyTower(
            "internvl.modeling_internvl", "InternVLVisionConfig", "InternVLVisionModel", tiny.INTERNVL_VISION
        ),
        tiny_model=TinyModel(
            "InternVLConfig",
            "InternVLForConditionalGeneration",
            tiny.internvl_fields,
            tiny.internvl_prompt,
            processors.internvl_processor,
        ),
        image_processor=tiny.internvl_image_processor,
        presets={
            "internvit-300m-d8": Preset({**shapes.INTERNVIT_300M, "num_hidden_layers": 8}),
            "internvit-300m": Preset(shapes.INTERNVIT_300M),
        },
        recommended=INTERNVL_RECOMMENDED,
        recommended_source=INTERNVL_SOURCE,
    ),
    Family(
        "internvl_chat",
        "InternVL-Chat",
        TILES,
        flops.internvl_flops,
        # The OpenGVLab checkpoints' own format (``trust_remote_code``): vLLM and SGLang only.
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMInternVLChatAdapter",
            {"InternVLChatModel": "vllm.model_executor.models.internvl"},
            {"InternVLChatModel": "vision_model"},
        ),
        sglang=SGLangClasses(f"{SGLANG_ADAPTERS}:SGLangInternVLChatAdapter", {"InternVLChatModel": "vision_model"}),
        recommended=INTERNVL_RECOMMENDED,
        recommended_source=INTERNVL_SOURCE,
    ),
    Family(
        "llava",
        "LLaVA 1.5",
        CROPS,
        flops.clip_vit_flops,
        hf=_hf(ClipViTAdapter, "Llava", "vision_tower"),
        vllm=_clip_vllm("VLLMClipViTAdapter", "LlavaForConditionalGeneration", "llava"),
        tiny_model=TinyModel(
            "LlavaConfig",
            "LlavaForConditionalGeneration",
            tiny.llava_fields,
            tiny.clip_family_prompt,
            partial(processors.clip_family_processor, "llava"),
        ),
        presets={
            "llava-1.5-7b": Preset(
                shapes.CLIP_VIT_L_336, tower="clip", use=ModelUse("LLaVA-1.5-7B", "llava", feature_layer=-2)
            ),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "llava_next",
        "LLaVA-NeXT",
        CROPS,
        flops.clip_vit_flops,
        hf=_hf(ClipViTAdapter, "LlavaNext", "vision_tower"),
        vllm=_clip_vllm("VLLMClipViTAdapter", "LlavaNextForConditionalGeneration", "llava_next"),
        tiny_model=TinyModel(
            "LlavaNextConfig",
            "LlavaNextForConditionalGeneration",
            tiny.llava_next_fields,
            tiny.anyres_prompt,
            partial(processors.clip_family_processor, "llava_next"),
        ),
        presets={
            "llava-next-7b-d8": Preset(
                {**shapes.CLIP_VIT_L_336, "num_hidden_layers": 8},
                tower="clip",
                use=ModelUse(
                    "LLaVA-NeXT-7B",
                    "llava_next",
                    feature_layer=-2,
                    grid_pinpoints=shapes.LLAVA_NEXT_PINPOINTS,
                    cases=("672x672",),
                ),
            ),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "llava_onevision",
        "LLaVA-OneVision",
        CROPS,
        flops.clip_vit_flops,
        hf=_hf(ClipViTAdapter, "LlavaOnevision", "vision_tower"),
        vllm=_clip_vllm("VLLMSiglipAdapter", "LlavaOnevisionForConditionalGeneration", "llava_onevision"),
        tiny_model=TinyModel(
            "LlavaOnevisionConfig",
            "LlavaOnevisionForConditionalGeneration",
            tiny.onevision_fields,
            tiny.anyres_prompt,
            partial(processors.crop_family_processor, "llava_onevision"),
        ),
        presets={
            "llava-onevision-7b-d8": Preset(
                {**shapes.SIGLIP_SO400M_384_ONEVISION, "num_hidden_layers": 8},
                tower="siglip",
                use=ModelUse(
                    "LLaVA-OneVision-7B",
                    "llava_onevision",
                    feature_layer=-1,
                    grid_pinpoints=shapes.ONEVISION_PINPOINTS,
                    anyres_module="llava_onevision.modeling_llava_onevision",
                    cases=("768x768",),
                ),
            ),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "gemma3",
        "Gemma 3",
        CROPS,
        flops.clip_vit_flops,
        hf=_hf(ClipViTAdapter, "Gemma3", "vision_tower"),
        vllm=_clip_vllm("VLLMSiglipAdapter", "Gemma3ForConditionalGeneration", "gemma3_mm"),
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangSiglipAdapter", {"Gemma3ForConditionalGeneration": "vision_tower"}
        ),
        tiny_model=TinyModel(
            "Gemma3Config",
            "Gemma3ForConditionalGeneration",
            tiny.gemma3_fields,
            tiny.clip_family_prompt,
            partial(processors.clip_family_processor, "gemma3"),
        ),
        recommended_source=UNTUNED,
    ),
    Family(
        "paligemma",
        "PaliGemma",
        CROPS,
        flops.clip_vit_flops,
        hf=_hf(ClipViTAdapter, "PaliGemma", "vision_tower"),
        vllm=_clip_vllm("VLLMSiglipAdapter", "PaliGemmaForConditionalGeneration", "paligemma"),
        tiny_model=TinyModel(
            "PaliGemmaConfig",
            "PaliGemmaForConditionalGeneration",
            tiny.paligemma_fields,
            tiny.clip_family_prompt,
            partial(processors.clip_family_processor, "paligemma"),
        ),
        recommended_source=UNTUNED,
    ),
    Family(
        "idefics3",
        "Idefics3",
        SUB_IMAGES,
        flops.idefics3_flops,
        hf=_hf(Idefics3Adapter, "Idefics3", "vision_model", ("Idefics3VisionTransformer",), decoder="text_model"),
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMIdefics3Adapter",
            {"Idefics3ForConditionalGeneration": "vllm.model_executor.models.idefics3"},
            {"Idefics3ForConditionalGeneration": "model.vision_model"},
        ),
        tiny_tower=TinyTower(
            "idefics3.modeling_idefics3", "Idefics3VisionConfig", "Idefics3VisionTransformer", tiny.IDEFICS3_VISION
        ),
        tiny_model=TinyModel(
            "Idefics3Config",
            "Idefics3ForConditionalGeneration",
            tiny.idefics3_fields("idefics3"),
            tiny.idefics3_prompt,
            partial(processors.crop_family_processor, "idefics3"),
        ),
        image_processor=tiny.siglip_image_processor,  # one sub-image per image
        presets={
            "idefics3-8b-d8": Preset(
                {**shapes.IDEFICS3_8B_VISION, "num_hidden_layers": 8},
                use=ModelUse("Idefics3-8B", "idefics3", cases=("728x700",)),
            ),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "smolvlm",
        "SmolVLM",
        SUB_IMAGES,
        flops.idefics3_flops,
        hf=_hf(Idefics3Adapter, "SmolVLM", "vision_model", ("SmolVLMVisionTransformer",), decoder="text_model"),
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMIdefics3Adapter",
            {"SmolVLMForConditionalGeneration": "vllm.model_executor.models.smolvlm"},
            {"SmolVLMForConditionalGeneration": "model.vision_model"},
        ),
        tiny_tower=TinyTower(
            "smolvlm.modeling_smolvlm",
            "SmolVLMVisionConfig",
            "SmolVLMVisionTransformer",
            {**tiny.IDEFICS3_VISION, "model_type": "smolvlm_vision"},
        ),
        tiny_model=TinyModel(
            "SmolVLMConfig",
            "SmolVLMForConditionalGeneration",
            tiny.idefics3_fields("smolvlm"),
            tiny.idefics3_prompt,
            partial(processors.crop_family_processor, "smolvlm"),
        ),
        image_processor=tiny.siglip_image_processor,
        recommended_source=UNTUNED,
    ),
    Family(
        "qwen3_5",
        "Qwen3.5",
        GRID,
        flops.qwen3_vl_flops,
        # Dense and MoE share the tower (one class each) and the layout; the decoders are hybrid
        # (Gated DeltaNet + full attention), which LLM-side pruners refuse.
        hf=HFClasses(
            Qwen3_5Adapter,
            ("Qwen3_5VisionModel", "Qwen3_5MoeVisionModel"),
            {
                "Qwen3_5ForConditionalGeneration": "model.visual",
                "Qwen3_5Model": "visual",
                "Qwen3_5MoeForConditionalGeneration": "model.visual",
                "Qwen3_5MoeModel": "visual",
            },
            {
                "Qwen3_5ForConditionalGeneration": "model",
                "Qwen3_5Model": "",
                "Qwen3_5MoeForConditionalGeneration": "model",
                "Qwen3_5MoeModel": "",
            },
        ),
        # vLLM's and SGLang's Qwen3.5 classes derive from their Qwen3-VL ones and build its tower
        # (without DeepStack taps).
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMQwen3_5Adapter",
            {
                "Qwen3_5ForConditionalGeneration": "vllm.model_executor.models.qwen3_5",
                "Qwen3_5MoeForConditionalGeneration": "vllm.model_executor.models.qwen3_5",
            },
            {"Qwen3_5ForConditionalGeneration": "visual", "Qwen3_5MoeForConditionalGeneration": "visual"},
        ),
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangQwen3_5Adapter",
            {"Qwen3_5ForConditionalGeneration": "visual", "Qwen3_5MoeForConditionalGeneration": "visual"},
        ),
        tiny_tower=TinyTower(
            "qwen3_5.modeling_qwen3_5", "Qwen3_5VisionConfig", "Qwen3_5VisionModel", tiny.QWEN3_5_VISION
        ),
        tiny_model=TinyModel(
            "Qwen3_5Config",
            "Qwen3_5ForConditionalGeneration",
            tiny.qwen3_5_fields,
            tiny.qwen_prompt,
            processors.qwen_processor,
        ),
        image_processor=tiny.qwen_image_processor,
        presets={
            "qwen3.5-397b-a17b": Preset(shapes.QWEN3_5_VISION),
            "qwen3.5-397b-a17b-d8": Preset({**shapes.QWEN3_5_VISION, "depth": 8}),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "gemma4",
        "Gemma 4",
        PATCHES,
        flops.gemma4_flops,
        hf=_hf(
            Gemma4Adapter,
            "Gemma4",
            "vision_tower",
            ("Gemma4VisionModel",),
            decoder="language_model",
            llm_refusal=GEMMA4_LLM_REFUSAL,
        ),
        # vLLM builds transformers' tower but calls its encoder itself: the encoder is patched.
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMGemma4Adapter",
            {"Gemma4ForConditionalGeneration": "vllm.model_executor.models.gemma4_mm"},
            {"Gemma4ForConditionalGeneration": "vision_tower.encoder"},
        ),
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangGemma4Adapter", {"Gemma4ForConditionalGeneration": "vision_tower"}
        ),
        tiny_tower=TinyTower("gemma4.modeling_gemma4", "Gemma4VisionConfig", "Gemma4VisionModel", tiny.GEMMA4_VISION),
        tiny_model=TinyModel(
            "Gemma4Config",
            "Gemma4ForConditionalGeneration",
            tiny.gemma4_fields,
            tiny.gemma4_prompt,
            processors.gemma4_processor,
        ),
        image_processor=tiny.gemma4_image_processor,
        presets={
            "gemma4-e2b": Preset(shapes.GEMMA4_VISION),
            "gemma4-e2b-d8": Preset({**shapes.GEMMA4_VISION, "num_hidden_layers": 8}),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "kimi_k25",
        "Kimi-K2.5",
        GRID,
        flops.kimi_k25_flops,
        # The decoder is DeepSeek-V3's (MLA attention, MoE): FastV / DART are refused there (spec §5.10).
        hf=_hf(KimiK25Adapter, "Kimi_K25", "vision_tower", ("Kimi_K25VisionModel",), llm_refusal=KIMI_K25_LLM_REFUSAL),
        # vLLM builds a tower of its own (MoonViT: fused wqkv, interleaved complex rotary) at vision_tower.
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMKimiK25Adapter",
            {"KimiK25ForConditionalGeneration": "vllm.model_executor.models.kimi_k25"},
            {"KimiK25ForConditionalGeneration": "vision_tower"},
        ),
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangKimiK25Adapter", {"KimiK25ForConditionalGeneration": "vision_tower"}
        ),
        tiny_tower=TinyTower(
            "kimi_k25.modeling_kimi_k25", "Kimi_K25VisionConfig", "Kimi_K25VisionModel", tiny.KIMI_K25_VISION
        ),
        tiny_model=TinyModel(
            "Kimi_K25Config",
            "Kimi_K25ForConditionalGeneration",
            tiny.kimi_k25_fields,
            tiny.kimi_k25_prompt,
            processors.kimi_k25_processor,
        ),
        image_processor=processors.kimi_k25_image_processor,
        presets={
            "kimi-k2.5": Preset(shapes.KIMI_K25_VISION),
            "kimi-k2.5-d8": Preset({**shapes.KIMI_K25_VISION, "num_hidden_layers": 8}),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "mistral3",
        "Mistral 3",
        IMAGES,
        flops.pixtral_flops,
        hf=_hf(PixtralAdapter, "Mistral3", "vision_tower", ("PixtralVisionModel",)),
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMPixtralAdapter",
            {"Mistral3ForConditionalGeneration": "vllm.model_executor.models.mistral3"},
            {"Mistral3ForConditionalGeneration": "vision_tower"},
        ),
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangPixtralAdapter", {"Mistral3ForConditionalGeneration": "vision_tower"}
        ),
        tiny_tower=TinyTower(
            "pixtral.modeling_pixtral", "PixtralVisionConfig", "PixtralVisionModel", tiny.PIXTRAL_VISION
        ),
        tiny_model=TinyModel(
            "Mistral3Config",
            "Mistral3ForConditionalGeneration",
            tiny.mistral3_fields,
            tiny.mistral3_prompt,
            processors.mistral3_processor,
        ),
        image_processor=tiny.pixtral_image_processor,
        presets={
            "mistral-small-3.1-24b": Preset(shapes.MISTRAL3_PIXTRAL_VISION),
            "mistral-small-3.1-24b-d8": Preset({**shapes.MISTRAL3_PIXTRAL_VISION, "num_hidden_layers": 8}),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "llava_onevision1_5",
        "LLaVA-OneVision-1.5",
        GRID_CLS,
        flops.onevision1_5_flops,
        # In transformers after 5.19 only: its tests skip elsewhere (``Family.unavailable``).
        hf=_hf(LlavaOnevision15Adapter, "LlavaOnevision15", "visual", ("LlavaOnevision15VisionModel",)),
        tiny_tower=TinyTower(
            "llava_onevision1_5.modeling_llava_onevision1_5",
            "LlavaOnevision15VisionConfig",
            "LlavaOnevision15VisionModel",
            tiny.ONEVISION1_5_VISION,
        ),
        tiny_model=TinyModel(
            "LlavaOnevision15Config",
            "LlavaOnevision15ForConditionalGeneration",
            tiny.onevision1_5_fields,
            tiny.onevision1_5_prompt,
            processors.onevision1_5_processor,
        ),
        image_processor=tiny.onevision1_5_image_processor,
        presets={
            "llava-onevision-1.5-8b": Preset(shapes.ONEVISION1_5_8B_VISION),
            "llava-onevision-1.5-8b-d8": Preset({**shapes.ONEVISION1_5_8B_VISION, "depth": 8}),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "glm4v",
        "GLM-4.1V / 4.5V / 4.6V",
        FRAMES,
        flops.glm4v_flops,
        # GLM-4.1V (dense decoder), GLM-4.5V (MoE decoder, its own tower class of the same code) and
        # GLM-4.6V (``Glm46V*``: GLM-4.1V's tower, a dense or MoE decoder by its text config).
        hf=HFClasses(
            Glm4vAdapter,
            ("Glm4vVisionModel", "Glm4vMoeVisionModel"),
            {
                "Glm4vForConditionalGeneration": "model.visual",
                "Glm4vModel": "visual",
                "Glm4vMoeForConditionalGeneration": "model.visual",
                "Glm4vMoeModel": "visual",
                "Glm46VForConditionalGeneration": "model.visual",
                "Glm46VModel": "visual",
            },
            {
                "Glm4vForConditionalGeneration": "model",
                "Glm4vModel": "",
                "Glm4vMoeForConditionalGeneration": "model",
                "Glm4vMoeModel": "",
                "Glm46VForConditionalGeneration": "model",
                "Glm46VModel": "",
            },
        ),
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMGlm4vAdapter",
            {
                "Glm4vForConditionalGeneration": "vllm.model_executor.models.glm4_1v",
                "Glm4vMoeForConditionalGeneration": "vllm.model_executor.models.glm4_1v",
            },
            {"Glm4vForConditionalGeneration": "visual", "Glm4vMoeForConditionalGeneration": "visual"},
        ),
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangGlm4vAdapter",
            {"Glm4vForConditionalGeneration": "visual", "Glm4vMoeForConditionalGeneration": "visual"},
        ),
        tiny_tower=TinyTower("glm4v.modeling_glm4v", "Glm4vVisionConfig", "Glm4vVisionModel", tiny.GLM4V_VISION),
        tiny_model=TinyModel(
            "Glm4vConfig",
            "Glm4vForConditionalGeneration",
            tiny.glm4v_fields,
            tiny.glm4v_prompt,
            processors.qwen_processor,  # GLM's special-token ids are the tiny Qwen processor's
        ),
        image_processor=tiny.glm4v_image_processor,
        presets={
            "glm-4.1v-9b": Preset(shapes.GLM4V_9B_VISION),
            "glm-4.1v-9b-d8": Preset({**shapes.GLM4V_9B_VISION, "depth": 8}),
        },
        recommended_source=UNTUNED,
    ),
    Family(
        "minicpmv",
        "MiniCPM-V 4.6 / 4.7",
        SLICES,
        flops.minicpmv_flops,
        # One tower under two names; 4.7 (transformers >= 5.19) changes the language model's
        # positions only. The decoder is Qwen3.5's hybrid one, which LLM-side pruners refuse.
        hf=HFClasses(
            MiniCPMVAdapter,
            ("MiniCPMV4_6VisionModel", "MiniCPMV4_7VisionModel"),
            {
                "MiniCPMV4_6ForConditionalGeneration": "model.vision_tower",
                "MiniCPMV4_6Model": "vision_tower",
                "MiniCPMV4_7ForConditionalGeneration": "model.vision_tower",
                "MiniCPMV4_7Model": "vision_tower",
            },
            {
                "MiniCPMV4_6ForConditionalGeneration": "model",
                "MiniCPMV4_6Model": "",
                "MiniCPMV4_7ForConditionalGeneration": "model",
                "MiniCPMV4_7Model": "",
            },
        ),
        # vLLM builds its own tower (Idefics2's SigLIP layers as ``vpm``, the merger beside it) and
        # runs its layers from the model's get_vision_hidden_states, which the adapter wraps.
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMMiniCPMVAdapter",
            {
                "MiniCPMV4_6ForConditionalGeneration": "vllm.model_executor.models.minicpmv4_6",
                "MiniCPMV4_7ForConditionalGeneration": "vllm.model_executor.models.minicpmv4_7",
            },
            {"MiniCPMV4_6ForConditionalGeneration": "vpm", "MiniCPMV4_7ForConditionalGeneration": "vpm"},
        ),
        # SGLang's classes are wrappers (not modules) holding the model of the checkpoint's version
        # as ``minicpmv`` (``MiniCPMV4_6``, or its subclass ``MiniCPMV4_7``), whose packed tower
        # (transformers' call) is ``vpm``; either may be handed to IPCV.
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangMiniCPMVAdapter",
            {
                "MiniCPMV4_6ForConditionalGeneration": "minicpmv.vpm",
                "MiniCPMV4_7ForConditionalGeneration": "minicpmv.vpm",
                "MiniCPMV4_6": "vpm",
            },
        ),
        tiny_tower=TinyTower(
            "minicpmv4_6.modeling_minicpmv4_6",
            "MiniCPMV4_6VisionConfig",
            "MiniCPMV4_6VisionModel",
            tiny.MINICPMV_VISION,
        ),
        tiny_model=TinyModel(
            "MiniCPMV4_6Config",
            "MiniCPMV4_6ForConditionalGeneration",
            tiny.minicpmv_fields,
            tiny.minicpmv_prompt,
            processors.minicpmv_processor,
        ),
        image_processor=tiny.minicpmv_image_processor,
        presets={
            "minicpm-v-4.6": Preset(shapes.MINICPMV4_6_VISION),
            # Reduced depth keeping insert_layer_id = 6, so that IPCV's blocks (8 ..) exist.
            "minicpm-v-4.6-d12": Preset({**shapes.MINICPMV4_6_VISION, "num_hidden_layers": 12}),
        },
        recommended=MINICPMV_RECOMMENDED,
        recommended_source=MINICPMV_SOURCE,
        min_transformers=processors.MINICPMV_MIXED_SLICES,
    ),
    Family(
        "llama4",
        "Llama 4",
        TILES,
        flops.llama4_flops,
        # The tower sits on the full model itself (no base model in between), in vLLM and SGLang too
        # (their own layers); the decoder is Llama4ForCausalLM's, refused to LLM-side pruners (spec §5).
        hf=HFClasses(
            Llama4Adapter,
            ("Llama4VisionModel",),
            {"Llama4ForConditionalGeneration": "vision_model"},
            {"Llama4ForConditionalGeneration": ""},
            decoder="language_model",
            llm_refusal=LLAMA4_LLM_REFUSAL,
        ),
        vllm=VLLMClasses(
            f"{VLLM_ADAPTERS}:VLLMLlama4Adapter",
            {"Llama4ForConditionalGeneration": "vllm.model_executor.models.mllama4"},
            {"Llama4ForConditionalGeneration": "vision_model"},
        ),
        sglang=SGLangClasses(
            f"{SGLANG_ADAPTERS}:SGLangLlama4Adapter", {"Llama4ForConditionalGeneration": "vision_model"}
        ),
        tiny_tower=TinyTower("llama4.modeling_llama4", "Llama4VisionConfig", "Llama4VisionModel", tiny.LLAMA4_VISION),
        tiny_model=TinyModel(
            "Llama4Config",
            "Llama4ForConditionalGeneration",
            tiny.llama4_fields,
            tiny.llama4_prompt,
            processors.llama4_processor,
        ),
        image_processor=tiny.llama4_image_processor,
        presets={
            "llama4-scout": Preset(shapes.LLAMA4_SCOUT_VISION),
            "llama4-scout-d8": Preset({**shapes.LLAMA4_SCOUT_VISION, "num_hidden_layers": 8}),
        },
        recommended_source=UNTUNED,
    ),
    # Bare towers last: a full model above names its own tower.
    Family(
        "clip",
        "CLIP",
        CROPS,
        flops.clip_vit_flops,
        hf=HFClasses(ClipViTAdapter, ("CLIPVisionModel",)),
        tiny_tower=TinyTower("clip.modeling_clip", "CLIPVisionConfig", "CLIPVisionModel", tiny.CLIP_VISION),
        image_processor=tiny.clip_image_processor,
        presets={"clip-vit-l-336-d8": Preset({**shapes.CLIP_VIT_L_336, "num_hidden_layers": 8})},
        recommended_source=UNTUNED,
    ),
    Family(
        "siglip",
        "SigLIP",
        CROPS,
        flops.clip_vit_flops,
        hf=HFClasses(ClipViTAdapter, ("SiglipVisionModel",)),
        tiny_tower=TinyTower("siglip.modeling_siglip", "SiglipVisionConfig", "SiglipVisionModel", tiny.SIGLIP_VISION),
        image_processor=tiny.siglip_image_processor,
        presets={
            "siglip-so400m-d8": Preset({**shapes.SIGLIP_SO400M_896, "num_hidden_layers": 8}),
            "siglip-so400m-384-d8": Preset({**shapes.SIGLIP_SO400M_896, "image_size": 384, "num_hidden_layers": 8}),
        },
        recommended_source=UNTUNED,
    ),
)
