"""The vision towers the benchmarks run: a preset's shape with seeded random weights, or the vision
tower of a local checkpoint (its tensors read from the safetensors shards, the LLM left on disk).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .presets import MODEL_PRESETS, PRESET_FAMILIES

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Where a full Qwen2-VL checkpoint keeps its vision tower's tensors (transformers >= 5 / older).
VISION_PREFIXES = ("model.visual.", "visual.")


def vision_config_from_preset(name: str, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """A ``Qwen2VLVisionConfig`` (or ``Qwen2_5_VLVisionConfig``) for a ``MODEL_PRESETS`` name."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    if name not in MODEL_PRESETS:
        raise ValueError(f"preset must be one of {list(MODEL_PRESETS)}, got {name!r}")
    config_class = Qwen2_5_VLVisionConfig if PRESET_FAMILIES.get(name) == "qwen2_5_vl" else Qwen2VLVisionConfig
    config = config_class(**MODEL_PRESETS[name])
    config._attn_implementation = attn_implementation
    return config


def build_tower(
    vision_config: PretrainedConfig, *, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> nn.Module:
    """The tower with seeded random weights, created directly on ``device`` (no host copy)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    tower_class = (
        Qwen2_5_VisionTransformerPretrainedModel
        if vision_config.model_type == "qwen2_5_vl_vision"
        else Qwen2VisionTransformerPretrainedModel
    )
    torch.manual_seed(seed)
    with torch.device(device):
        tower = tower_class(vision_config)
    return tower.to(dtype=dtype).eval()


def read_vision_state_dict(root: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of the checkpoint in ``root``, named as the tower names them.

    Only tensors named ``visual.*`` / ``model.visual.*`` are read, shard by shard (the shards the
    safetensors index lists, else every ``*.safetensors`` file), so a 7B checkpoint costs the
    ~1.3 GB of its tower, not 16 GB.

    Raises:
        ValueError: no safetensors files, or none of them holds a vision-tower tensor.
    """
    from safetensors import safe_open

    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in root.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"model: no safetensors files in {str(root)!r}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(root / shard), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix) :]] = handle.get_tensor(key)
    if not state:
        raise ValueError(f"model: no vision-tower tensors ({' or '.join(VISION_PREFIXES)}*) in {str(root)!r}")
    return state


def load_vision_tower(
    path: str | Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"
) -> nn.Module:
    """The vision tower of a local Qwen2-VL checkpoint directory, without loading the LLM.

    ``path`` holds either a full Qwen2-VL model (``config.json`` with a ``vision_config`` and
    safetensors shards, as ``save_pretrained`` or the Hub write them; see ``read_vision_state_dict``)
    or a saved tower alone (``model_type`` ``qwen2_vl_vision``).

    Raises:
        ValueError: ``path`` is not a checkpoint directory, or holds no Qwen2-VL vision tower.
    """
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    root = Path(path)
    if not (root / "config.json").is_file():
        raise ValueError(f"model: {str(root)!r} is not a directory with a config.json")
    config = AutoConfig.from_pretrained(root)
    if getattr(config, "model_type", None) == "qwen2_vl_vision":
        tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(
            root, dtype=dtype, attn_implementation=attn_implementation
        )
        return tower.to(device).eval()
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        raise ValueError(f"model: {str(root)!r} has no vision_config (not a Qwen2-VL checkpoint)")
    vision_config._attn_implementation = attn_implementation
    state = read_vision_state_dict(root)
    with torch.device("meta"):
        tower = Qwen2VisionTransformerPretrainedModel(vision_config)
    tower.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the rotary inverse frequencies) are not in checkpoints: recompute.
    tower.rotary_pos_emb = type(tower.rotary_pos_emb)(vision_config)
    return tower.to(device=device, dtype=dtype).eval()


def tower_output(output: Any) -> torch.Tensor:
    """The merger's output: ``pooler_output`` (transformers >= 5) or the returned tensor (older)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
