"""The SGLang plugin: ``register`` (the ``sglang.srt.plugins`` entry point) and the functions that
patch an SGLang model instance.

SGLang runs its general plugins (``sglang.srt.plugins.load_plugins``) early in every process it
starts (engine, scheduler / model workers, one per tensor-parallel rank) and then applies the hooks
they registered. ``register`` puts one AFTER hook on
``sglang.srt.model_loader.loader._initialize_model``, the function every SGLang model loader
(default, dummy, sharded, remote, ...) calls to build the model from its config before loading
weights. The hook reads ``hf_config.ipcv`` — what ``--json-model-override-args '{"ipcv": {...}}'``
merges into the model's config — and, when present, installs IPCV on the new instance's vision
tower. Without an ``ipcv`` key nothing changes. (Replacing a model class through the hook registry
would not take effect: SGLang's model registry reads each module's ``EntryClass``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..config import IPCVConfig
from ..engine import IPCVPatch
from ..families import SGLANG_PATCHING, find_sglang_family, recommended_config

CONFIG_KEY = "ipcv"
HOOK_TARGET = "sglang.srt.model_loader.loader._initialize_model"
# flashinfer_cudnn's metadata holds padded offsets of the full sequence, which IPCV shrinks per block.
REFUSED_ATTENTION_BACKENDS = ("flashinfer_cudnn",)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the hook that patches each model SGLang
    builds (``after_initialize_model``). Idempotent; imports no SGLang model module."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks = HookRegistry._hooks.get(HOOK_TARGET, [])
    if any(hook is after_initialize_model for _, hook, _ in hooks):
        return
    HookRegistry.register(HOOK_TARGET, after_initialize_model, HookType.AFTER)


def after_initialize_model(model: nn.Module, model_config: Any, *args: Any, **kwargs: Any) -> None:
    """The AFTER hook of ``_initialize_model(model_config, load_config, quant_config)``: apply
    ``model_config.hf_config.ipcv`` to the model just built (``apply_from_config``). Returns
    ``None``, so SGLang keeps the model it built.

    A speculative-decoding draft model (``model_config.is_draft_model``) is left alone: SGLang
    gives it the same ``--json-model-override-args``, and it encodes no images."""
    if getattr(model_config, "is_draft_model", False):
        return
    apply_from_config(model, model_config.hf_config)


def check_engine_settings() -> None:
    """Refuse the SGLang settings IPCV cannot work with (``ValueError``, never silently ignored):
    a CUDA-graphed ViT (``SGLANG_VIT_ENABLE_CUDA_GRAPH``) and the ``flashinfer_cudnn`` multimodal
    attention backend. Reads the server arguments SGLang published in this process, if any."""
    from .adapters import CUDA_GRAPH_VARIABLE, vit_cuda_graph_enabled

    if vit_cuda_graph_enabled():
        raise ValueError(
            f"IPCV cannot run in SGLang's CUDA-graphed vision encoder: unset {CUDA_GRAPH_VARIABLE} or remove the "
            f"'{CONFIG_KEY}' key from --json-model-override-args"
        )
    backend = _mm_attention_backend()
    if backend in REFUSED_ATTENTION_BACKENDS:
        raise ValueError(
            f"IPCV does not support --mm-attention-backend {backend} (its metadata holds padded offsets of the full "
            f"sequence): choose another backend or remove the '{CONFIG_KEY}' key from --json-model-override-args"
        )


def _mm_attention_backend() -> str | None:
    """The published ``--mm-attention-backend`` (``None`` when unset or nothing is published)."""
    try:
        from sglang.srt.runtime_context import get_mm

        return get_mm().mm_attention_backend
    except (ImportError, ValueError, RuntimeError, AttributeError):
        return None


def apply_from_config(model: nn.Module, hf_config: Any) -> IPCVPatch | None:
    """Install IPCV on ``model`` (an SGLang model just built) if ``hf_config.ipcv`` asks for it.

    ``hf_config.ipcv``: a mapping of ``IPCVConfig`` fields; missing ones take the family's
    recommended setting. Returns the installed patch, or ``None`` without an ``ipcv`` key or
    when the model was built without its vision tower (the settings are still validated).

    Raises:
        TypeError: ``ipcv`` not a mapping, an unknown field or a field of the wrong type, or a
            model of no supported family.
        ValueError: a field out of range (``prune_layer`` is checked against the tower's depth),
            or engine settings that IPCV cannot work with (``check_engine_settings``).
    """
    settings = getattr(hf_config, CONFIG_KEY, None)
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise TypeError(
            f"--json-model-override-args' '{CONFIG_KEY}' must be a dict of IPCVConfig fields, "
            f"got {type(settings).__name__}"
        )
    check_engine_settings()
    config = recommended_config(model, **settings)  # validated, whatever the model holds
    _, tower = find_sglang_family(model)
    if tower is None:
        # Built without its tower (``--language-only``, the language side of an encoder /
        # language split, which gets the same override arguments): nothing encodes images here.
        return None
    return apply_ipcv(model, config)


def apply_ipcv(model: nn.Module, config: IPCVConfig | None = None) -> IPCVPatch:
    """Patch an SGLang model instance's vision tower with IPCV (replacing a previous patch).

    ``config=None`` takes the family's recommended setting. Returns the installed patch
    (``engine.serving.EnginePatching`` with SGLang's family look-up).

    Raises:
        TypeError: unsupported model (or one built without its vision tower, e.g.
            ``--language-only``), ``config`` not an ``IPCVConfig``, or an SGLang version whose
            blocks the adapter does not know.
        ValueError: ``config.prune_layer`` outside ``[1, depth)`` of the tower, or a CUDA-graphed
            tower.
    """
    # The adapter's ``blocks`` refuses a CUDA-graphed tower or an unknown SGLang version.
    return SGLANG_PATCHING.apply(model, config)


def remove_ipcv(model: nn.Module) -> nn.Module:
    """Undo ``apply_ipcv`` on an SGLang model (a no-op when unpatched); return it."""
    return SGLANG_PATCHING.remove(model)
