"""The variants the vision-tower benchmark compares, by name.

- ``unpatched`` (a): the model as built.
- ``paper`` (b): the paper code's formulation: IPCV with ``as_queries="all"`` (the model's own
  block on the full reconstructed sequence in the stabilisation blocks, dropped rows discarded
  afterwards) and the ``"torch"`` planning backend (a dense distance matrix per tile, like
  ``torch.cdist``).
- ``ipcv`` (c): IPCV with kept queries only and ``backend="auto"`` for every op (the fastest
  backend registered for the device).
- ``ipcv_<backend>`` (e.g. ``ipcv_torch_varlen``, ``ipcv_flash_attn``, ``ipcv_sdpa``): (c) with
  that ``ngr_attention`` backend in the stabilisation blocks, so that one run compares attention
  kernels end to end.

Kept apart from the benchmark's run so that its report can name the columns without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..config import IPCVConfig

VARIANTS = ("unpatched", "paper", "ipcv")
# (c) with a named ngr_attention backend in the stabilisation blocks: "ipcv_<backend>".
ATTENTION_VARIANT_PREFIX = "ipcv_"


def variant_configs(ipcv: IPCVConfig, variants: Sequence[str] = VARIANTS) -> dict[str, IPCVConfig | None]:
    """The benchmarked variants' configs for one IPCV setting (its ``ops_backend`` and ``attention_backend`` ignored)."""
    configs: dict[str, IPCVConfig | None] = {
        "unpatched": None,
        "paper": replace(ipcv, as_queries="all", ops_backend="torch", attention_backend="torch"),
        "ipcv": replace(ipcv, as_queries="kept", ops_backend="auto", attention_backend="auto"),
    }
    for variant in variants:
        if variant not in configs:
            attention = attention_variant_backend(variant)
            configs[variant] = replace(configs["ipcv"], attention_backend=attention)
    return {v: configs[v] for v in variants}


def attention_variant_backend(variant: str) -> str:
    """``"torch_varlen"`` of ``"ipcv_torch_varlen"``; ``ValueError`` for other names."""
    if not variant.startswith(ATTENTION_VARIANT_PREFIX) or variant in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS} or ipcv_<ngr_attention backend>")
    return variant.removeprefix(ATTENTION_VARIANT_PREFIX)


def attention_variants(variants: Sequence[str]) -> list[str]:
    """The ``ipcv_<backend>`` variants among ``variants``, in order."""
    return [v for v in variants if v.startswith(ATTENTION_VARIANT_PREFIX)]
