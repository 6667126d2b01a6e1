"""The configuration classes of InternVL's own checkpoint format (``OpenGVLab/InternVL2-*``,
``InternVL2_5-*``, ``InternVL3-*``), for the tiny test checkpoints of ``ipcv_kernels.vllm.testing``.

Those checkpoints ship their configuration as remote code (``configuration_internvl_chat.py``,
loaded with ``trust_remote_code=True``); no such file can be downloaded here, so
``build_checkpoint(path, "internvl_chat")`` copies this module into the checkpoint under that
name. It holds the fields vLLM's ``InternVLChatModel`` reads, with the OpenGVLab names and
defaults: ``vision_config`` (InternViT), ``llm_config`` (the language model's config; vLLM reads
it as ``text_config``), ``select_layer``, ``downsample_ratio``, ``ps_version`` and the dynamic
tiling settings. It is written here, not copied from OpenGVLab's code.

Not imported by the package: transformers imports it from the checkpoint directory.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """InternViT: ``[CLS, patches]`` per tile, pre-norm layers with layer scales, fused ``qkv``."""

    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 14,
        image_size: int = 448,
        qkv_bias: bool = False,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        qk_normalization: bool = False,
        num_hidden_layers: int = 24,
        use_flash_attn: bool = False,
        hidden_act: str = "gelu",
        norm_type: str = "layer_norm",
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor


class InternVLChatConfig(PretrainedConfig):
    """InternViT + pixel shuffle + MLP projector (``mlp1``) + a language model (``llm_config``)."""

    model_type = "internvl_chat"

    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        llm_config: dict[str, Any] | None = None,
        select_layer: int = -1,
        force_image_size: int | None = None,
        downsample_ratio: float = 0.5,
        template: str | None = None,
        dynamic_image_size: bool = False,
        use_thumbnail: bool = False,
        ps_version: str = "v1",
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        vision_config = dict(vision_config or {})
        vision_config.pop("model_type", None)
        self.vision_config = InternVisionConfig(**vision_config)
        llm_config = dict(llm_config or {"model_type": "qwen2"})
        self.llm_config = AutoConfig.for_model(llm_config.pop("model_type"), **llm_config)
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output
