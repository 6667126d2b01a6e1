"""The vision towers the benchmarks run: a preset's shape with seeded random weights, or the vision
tower of a local checkpoint (its tensors read from the safetensors shards, the LLM left on disk).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..families import FAMILIES, ModelUse, TinyTower, find_family, presets
from ..testing.models import to_real_dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Where a full Qwen2-VL checkpoint keeps its vision tower's tensors (transformers >= 5 / older).
VISION_PREFIXES = ("model.visual.", "visual.")


def vision_config_from_preset(name: str, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The vision config of a preset of the family table (``Preset.vision`` in the config class of
    the row whose tower it is)."""
    table = presets()
    if name not in table:
        raise ValueError(f"preset must be one of {sorted(table)}, got {name!r}")
    row, preset = table[name]
    tower_row = row if preset.tower is None else next(r for r in FAMILIES if r.id == preset.tower)
    config = tower_row.tiny_tower.classes()[0](**preset.vision)
    config._attn_implementation = attn_implementation
    return config


def preset_use(name: str) -> ModelUse | None:
    """How the full model of preset ``name`` calls its tower (``None``: a bare tower call)."""
    return presets()[name][1].use


def _tiny_tower_of(vision_config: PretrainedConfig) -> TinyTower:
    """The row's ``TinyTower`` whose config class ``vision_config`` is (by name: one import)."""
    name = type(vision_config).__name__
    for row in FAMILIES:
        if row.tiny_tower is not None and row.tiny_tower.config_class == name:
            return row.tiny_tower
    raise ValueError(f"vision_config: no family of the table has a tower configured by {name}")


def build_tower(
    vision_config: PretrainedConfig, *, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> nn.Module:
    """The tower with seeded random weights, created directly on ``device`` (no host copy)."""
    tower_class = _tiny_tower_of(vision_config).classes()[1]
    torch.manual_seed(seed)
    with torch.device(device):
        tower = tower_class(vision_config)
    return to_real_dtype(tower, dtype).eval()  # Llama 4's complex rotary table kept complex


def read_vision_state_dict(root: Path, prefixes: tuple[str, ...] = VISION_PREFIXES) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of the checkpoint in ``root``, named as the tower names them.

    Only tensors named ``<prefix>*`` for one of ``prefixes`` (default ``visual.*`` /
    ``model.visual.*``, Qwen's) are read, shard by shard (the shards the safetensors index lists,
    else every ``*.safetensors`` file), so a 7B checkpoint costs the ~1.3 GB of its tower, not 16 GB.

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
                prefix = next((p for p in prefixes if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix) :]] = handle.get_tensor(key)
    if not state:
        raise ValueError(f"model: no vision-tower tensors ({' or '.join(prefixes)}*) in {str(root)!r}")
    return state


def converted_vision_state_dict(
    model: nn.Module, tower: nn.Module, name: str, state: dict[str, torch.Tensor], root: Path
) -> dict[str, torch.Tensor]:
    """The tower's tensors ``state`` (read under ``name``, the tower's path in the base model
    ``model``) converted from the checkpoint's layout to the tower's by transformers' own checkpoint
    conversion for ``model``, as ``from_pretrained`` converts them (Kimi-K2.5's Hub layout:
    ``vision_tower.encoder.blocks.*`` with a fused, rotary-permuted ``wqkv``). ``model`` is built
    on the meta device; only the tower's tensors are converted.

    Raises:
        ValueError: the converted tensors do not name every tensor of the tower.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    stored = {f"{name}.{key}": tensor for key, tensor in state.items()}
    mapping = get_model_conversion_mapping(model)
    convert_and_load_state_dict_in_model(model, stored, LoadStateDictConfig(weight_mapping=mapping))
    converted = tower.state_dict()
    missing = [key for key, tensor in converted.items() if tensor.is_meta]
    if missing:
        raise ValueError(f"model: {str(root)!r}: no tensors for {missing[:3]} of the vision tower in the checkpoint")
    return converted


def load_vision_tower(
    path: str | Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"
) -> nn.Module:
    """The vision tower of a local checkpoint directory of any supported family, without the LLM.

    ``path`` holds either a full multimodal model (``config.json`` with a ``vision_config`` and
    safetensors shards, as ``save_pretrained`` or the Hub write them) or a saved tower alone
    (``Qwen2VisionTransformerPretrainedModel``, ``CLIPVisionModel``, ``SiglipVisionModel``, ...).
    For a full model, its base model is built on the meta device from the config, the family table
    (``ipcv_kernels.families.find_family``) names its vision tower, and only that tower's
    tensors are read (``read_vision_state_dict``, under ``model.<tower path>.`` or ``<tower path>.``).

    Raises:
        ValueError: ``path`` is not a checkpoint directory, or holds no tower of a supported family.
    """
    from transformers import AutoConfig, AutoModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    root = Path(path)
    if not (root / "config.json").is_file():
        raise ValueError(f"model: {str(root)!r} is not a directory with a config.json")
    config = AutoConfig.from_pretrained(root)
    if getattr(config, "vision_config", None) is None:  # a saved bare tower
        tower_class = Qwen2VisionTransformerPretrainedModel if config.model_type == "qwen2_vl_vision" else AutoModel
        tower = tower_class.from_pretrained(root, dtype=dtype, attn_implementation=attn_implementation)
        try:
            find_family(tower)
        except TypeError as error:
            raise ValueError(f"model: {str(root)!r}: {error}") from None
        return tower.to(device).eval()
    with torch.device("meta"):
        model = AutoModel.from_config(config, attn_implementation=attn_implementation)
    try:
        _, skeleton = find_family(model)
    except TypeError as error:
        raise ValueError(f"model: {str(root)!r}: {error}") from None
    name = next(n for n, m in model.named_modules() if m is skeleton)
    state = read_vision_state_dict(root, (f"model.{name}.", f"{name}."))
    if set(state) != set(skeleton.state_dict()):
        # Stored in another layout than the tower's: converted as transformers converts it.
        state = converted_vision_state_dict(model, skeleton, name, state, root)
    # Built for real (not on meta) so that non-persistent buffers (rotary frequencies, position
    # ids) get their values; every parameter is then overwritten by the checkpoint's.
    torch.manual_seed(0)
    with torch.device(device):
        tower = type(skeleton)(skeleton.config)
    tower.load_state_dict(state, strict=True)
    return to_real_dtype(tower, dtype).eval()  # Llama 4's complex rotary table kept complex


def model_use(path: str | Path) -> ModelUse | None:
    """How the full model saved in ``path`` calls its vision tower, from its ``config.json``: its
    family (the family table's, ``find_family`` of the model built on the meta device),
    ``vision_feature_layer`` and anyres ``image_grid_pinpoints`` where it has them (LLaVA,
    LLaVA-NeXT, OneVision; the crops counted by its own modeling module). ``None`` for a saved
    bare tower.

    Raises:
        ValueError: ``path`` is not a checkpoint directory, or holds no model of a supported family.
    """
    from transformers import AutoConfig, AutoModel

    root = Path(path)
    if not (root / "config.json").is_file():
        raise ValueError(f"model: {str(root)!r} is not a directory with a config.json")
    config = AutoConfig.from_pretrained(root)
    if getattr(config, "vision_config", None) is None:
        return None
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    try:
        family, _ = find_family(model)
    except TypeError as error:
        raise ValueError(f"model: {str(root)!r}: {error}") from None
    layer = getattr(config, "vision_feature_layer", None)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    name = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return ModelUse(
        name,
        family.id,
        feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        grid_pinpoints=None if pinpoints is None else tuple(tuple(int(v) for v in p) for p in pinpoints),
        anyres_module=f"{config.model_type}.modeling_{config.model_type}",
    )


def tower_output(output: Any) -> torch.Tensor:
    """The merger's output: ``pooler_output`` (transformers >= 5) or the returned tensor (older)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
