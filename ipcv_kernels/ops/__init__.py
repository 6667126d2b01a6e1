"""Public op layer. Importing it registers every backend available in this install."""

import importlib.util

from . import (
    attention_backends,  # noqa: F401  (flash_attn / torch_varlen; their libraries load at call time)
    cpp_backend,  # noqa: F401  (backend "cpp" when the compiled extension csrc/ is built)
    torch_backend,  # noqa: F401  (registers the reference and sdpa backends)
)
from .api import (
    backend_for,
    knn,
    ngr_attention,
    ngr_reconstruct,
    ngr_restore,
    plan_ipcv,
    select_tokens,
    shrink_cu_seqlens,
    token_scores,
)
from .dispatch import available_backends, backend_names

# The Triton backends need the triton package (optional: ``pip install ipcv_kernels[triton]``).
if importlib.util.find_spec("triton") is not None:
    from . import triton_backend  # noqa: F401

__all__ = [
    "available_backends",
    "backend_for",
    "backend_names",
    "knn",
    "ngr_attention",
    "ngr_reconstruct",
    "ngr_restore",
    "plan_ipcv",
    "select_tokens",
    "shrink_cu_seqlens",
    "token_scores",
]
