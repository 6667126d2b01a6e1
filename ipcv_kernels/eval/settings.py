"""IPCV and LLM-pruner settings from evaluation model arguments (strings or parsed values).

lmms-eval hands model arguments as ``key=value`` pairs and converts ``true``/``false`` and
numbers itself; other callers may pass strings. ``build_settings`` accepts both.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from ..config import IPCVConfig
from ..llm import DART, FastV, LLMPruner

PRUNERS = ("none", "fastv", "dart")
# IPCVConfig's field defaults (the paper's Qwen2-VL-7B setting): the ``ipcv_*`` defaults below.
IPCV_DEFAULTS: dict[str, Any] = {field.name: field.default for field in fields(IPCVConfig)}


def as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a boolean (true / false), got {value!r}")


def as_number(name: str, value: object, kind: type) -> int | float:
    """``value`` as ``kind`` (``int`` or ``float``); strings are parsed, bools rejected."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a {kind.__name__}, got {value!r}")
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) or (kind is float and isinstance(value, float)):
        return kind(value)
    raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")


def build_settings(
    *,
    ipcv: object = True,
    ipcv_prune_layer: object = IPCV_DEFAULTS["prune_layer"],
    ipcv_ratio: object = IPCV_DEFAULTS["ratio"],
    ipcv_as_layers: object = IPCV_DEFAULTS["as_layers"],
    ipcv_num_neighbors: object = IPCV_DEFAULTS["num_neighbors"],
    ipcv_scope: str = IPCV_DEFAULTS["scope"],
    ipcv_ops_backend: str = IPCV_DEFAULTS["ops_backend"],
    ipcv_attention_backend: str = IPCV_DEFAULTS["attention_backend"],
    llm_pruner: str = "none",
    llm_layer: object = 2,
    llm_ratio: object | None = None,
    pivot_image_tokens: object = 4,
    pivot_text_tokens: object = 4,
    ipcv_selection: str = IPCV_DEFAULTS["selection"],
    ipcv_selection_seed: object = IPCV_DEFAULTS["selection_seed"],
) -> tuple[IPCVConfig | None, LLMPruner | None]:
    """The ``(IPCVConfig or None, pruner or None)`` pair that ``apply_ipcv`` takes.

    Args:
        ipcv: vision-side IPCV on (default) or off; ``ipcv_*`` are its ``IPCVConfig`` fields,
            with ``IPCVConfig``'s defaults (the paper's Qwen2-VL-7B setting).
        llm_pruner: ``"none"``, ``"fastv"`` or ``"dart"``.
        llm_layer, llm_ratio: the pruner's ``layer`` and ``ratio`` (``llm_ratio`` defaults to the
            pruner's own default: FastV 0.5, DART 0.778).
        pivot_image_tokens, pivot_text_tokens: DART's pivots.
        ipcv_selection, ipcv_selection_seed: ``IPCVConfig.selection`` (a selector's name) and
            ``selection_seed``.

    Raises:
        ValueError / TypeError: a setting of the wrong type or out of range, naming it.
    """
    config = None
    if as_bool("ipcv", ipcv):
        config = IPCVConfig(
            prune_layer=as_number("ipcv_prune_layer", ipcv_prune_layer, int),
            ratio=as_number("ipcv_ratio", ipcv_ratio, float),
            as_layers=as_number("ipcv_as_layers", ipcv_as_layers, int),
            num_neighbors=as_number("ipcv_num_neighbors", ipcv_num_neighbors, int),
            scope=ipcv_scope,
            ops_backend=ipcv_ops_backend,
            attention_backend=ipcv_attention_backend,
        )

    if config is not None:
        seed = as_number("ipcv_selection_seed", ipcv_selection_seed, int)
        config = replace(config, selection=ipcv_selection, selection_seed=seed)
    name = str(llm_pruner).lower()
    if name not in PRUNERS:
        raise ValueError(f"llm_pruner must be one of {list(PRUNERS)}, got {llm_pruner!r}")
    if name == "none":
        return config, None
    common = {"layer": as_number("llm_layer", llm_layer, int)}
    if llm_ratio is not None:
        common["ratio"] = as_number("llm_ratio", llm_ratio, float)
    if name == "fastv":
        return config, FastV(**common)
    return config, DART(
        **common,
        pivot_image_tokens=as_number("pivot_image_tokens", pivot_image_tokens, int),
        pivot_text_tokens=as_number("pivot_text_tokens", pivot_text_tokens, int),
    )
