"""The vLLM plugin: ``register`` (the ``vllm.general_plugins`` entry point) and the functions that
patch a vLLM model instance.

``register`` runs in every vLLM process before any model is built. It replaces, in vLLM's model
registry, each supported architecture's class by the same class extended with a constructor
(``ipcv_kernels.vllm.models``) that reads ``hf_config.ipcv`` — what
``LLM(..., hf_overrides={"ipcv": {...}})`` / ``--hf-overrides '{"ipcv": {...}}'`` sets — and,
when present, installs IPCV on the new instance's vision tower before its weights load. Without
an ``ipcv`` key the class behaves exactly as vLLM's.

``register`` also makes vLLM validate the ``ipcv`` dict as soon as the engine configuration is
built (``EngineArgs.create_engine_config``, in the process that parses the arguments: the API
server of ``vllm serve``, the caller of ``vllm.LLM``), so an invalid setting is refused within
seconds with a ``ValueError`` / ``TypeError`` naming the field, before any engine process starts
(``check_settings``). The model build checks again, with the tower's depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..config import IPCVConfig
from ..engine import IPCVPatch
from ..families import FAMILIES, VLLM_PATCHING, Family, recommended_config
from ..selectors import get_selector
from .compat import check_vllm_version

CONFIG_KEY = "ipcv"
_CHECKED = "_ipcv_checks_settings"  # marks vLLM's create_engine_config once wrapped


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the IPCV-capable model classes, make
    vLLM validate the ``ipcv`` dict when it builds its engine configuration (``check_settings``),
    and warn when the running vLLM lies outside the versions the plugin was checked against
    (``ipcv_kernels.vllm.compat``).

    Idempotent (vLLM may call it more than once per process); imports no vLLM model module.
    """
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs

    check_vllm_version()  # warns outside the checked range; the adapters check what they use
    for family in FAMILIES:
        for architecture in family.vllm.architectures if family.vllm else ():
            ModelRegistry.register_model(architecture, f"ipcv_kernels.vllm.models:{architecture}")
    if not getattr(EngineArgs.create_engine_config, _CHECKED, False):
        EngineArgs.create_engine_config = _checking_settings(EngineArgs.create_engine_config)


def _checking_settings(create_engine_config: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's ``EngineArgs.create_engine_config`` followed by ``check_settings`` on its result
    (the original stays reachable as ``__wrapped__``)."""

    @functools.wraps(create_engine_config)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = create_engine_config(self, *args, **kwargs)
        check_settings(vllm_config)
        return vllm_config

    setattr(checked, _CHECKED, True)
    return checked


def vllm_family(hf_config: Any) -> Family | None:
    """The row whose vLLM architectures include one of ``hf_config.architectures``; ``None`` if none."""
    architectures = set(getattr(hf_config, "architectures", None) or ())
    for family in FAMILIES:
        if family.vllm is not None and architectures.intersection(family.vllm.architectures):
            return family
    return None


def check_settings(vllm_config: Any) -> IPCVConfig | None:
    """Validate ``hf_config.ipcv`` of a freshly built engine configuration, before any model exists.

    Checks what needs no model: the ``ipcv`` value is a mapping, the architecture is one IPCV
    supports in vLLM, every field is an ``IPCVConfig`` field of the right type and range (missing
    ones take the family's recommended setting), the selector is registered, the model's
    configuration allows the setting (the adapter's ``check_model_config``: MiniCPM-V's prune layer
    after its in-tower merge) and the engine settings allow IPCV (``check_engine_settings``).
    ``prune_layer`` against the tower's depth is checked when the model is built. Returns the
    setting, or ``None`` without an ``ipcv`` key.

    Raises:
        TypeError: ``ipcv`` not a mapping, an unknown field or a field of the wrong type.
        ValueError: an unsupported architecture, a field out of range, an unknown selector, a
            setting the model's configuration rules out, or engine settings IPCV cannot work with.
            Each message names the field or setting.
    """
    hf_config = vllm_config.model_config.hf_config
    settings = getattr(hf_config, CONFIG_KEY, None)
    if settings is None:
        return None
    where = f"hf_overrides['{CONFIG_KEY}']"
    if not isinstance(settings, Mapping):
        raise TypeError(f"{where} must be a dict of IPCVConfig fields, got {type(settings).__name__}")
    family = vllm_family(hf_config)
    if family is None:
        supported = ", ".join(a for row in FAMILIES if row.vllm for a in row.vllm.architectures)
        raise ValueError(
            f"{where} is set, but IPCV does not support the architecture "
            f"{getattr(hf_config, 'architectures', None)} in vLLM (supported: {supported})"
        )
    try:
        config = IPCVConfig(**{**family.recommended, **settings})
        get_selector(config.selection)
        family.vllm.adapter_class().check_model_config(hf_config, config)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    check_engine_settings(vllm_config)
    return config


def check_engine_settings(vllm_config: Any) -> None:
    """Refuse the vLLM settings IPCV cannot work with (``ValueError``, never silently ignored).

    A compiled (``compile_mm_encoder``) or CUDA-graphed (``cudagraph_mm_encoder``) encoder fixes
    the token count of every block at capture time; IPCV changes it per input from block ``P`` on.
    """
    compilation = vllm_config.compilation_config
    for name in ("compile_mm_encoder", "cudagraph_mm_encoder"):
        if getattr(compilation, name, False):
            raise ValueError(
                f"IPCV cannot run in a compiled or CUDA-graphed vision encoder: disable "
                f"compilation_config.{name} or remove the 'ipcv' key from hf_overrides"
            )


def apply_from_config(model: nn.Module, vllm_config: Any) -> IPCVPatch | None:
    """Install IPCV on ``model`` (a vLLM model just built) if ``hf_config.ipcv`` asks for it.

    ``hf_config.ipcv``: a mapping of ``IPCVConfig`` fields; missing ones take the family's
    recommended setting. Returns the installed patch, or ``None`` without an ``ipcv`` key.

    Raises:
        TypeError: ``ipcv`` not a mapping, an unknown field or a field of the wrong type.
        ValueError: a field out of range (``prune_layer`` is checked against the tower's depth),
            or engine settings that IPCV cannot work with (``check_engine_settings``).
    """
    settings = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None)
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise TypeError(
            f"hf_overrides['{CONFIG_KEY}'] must be a dict of IPCVConfig fields, got {type(settings).__name__}"
        )
    check_engine_settings(vllm_config)
    return apply_ipcv(model, recommended_config(model, **settings))


def apply_ipcv(model: nn.Module, config: IPCVConfig | None = None) -> IPCVPatch:
    """Patch a vLLM model instance's vision tower with IPCV (replacing a previous patch).

    Also usable on a running engine: ``llm.apply_model(lambda m: apply_ipcv(m, config))``.
    ``config=None`` takes the family's recommended setting. Returns the installed patch
    (``engine.serving.EnginePatching`` with vLLM's family look-up).

    Raises:
        TypeError: unsupported model or ``config`` not an ``IPCVConfig``.
        ValueError: ``config.prune_layer`` outside ``[1, depth)`` of the tower.
    """
    return VLLM_PATCHING.apply(model, config)


def remove_ipcv(model: nn.Module) -> nn.Module:
    """Undo ``apply_ipcv`` on a vLLM model (a no-op when unpatched); return it."""
    return VLLM_PATCHING.remove(model)
