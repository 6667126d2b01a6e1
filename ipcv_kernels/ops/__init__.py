"""Public op layer. Importing it registers every backend available in this install."""

from . import torch_backend  # noqa: F401  (registers the reference and sdpa backends)
from .api import (
    backend_for,
    knn,
    ngr_attention,
    ngr_reconstruct,
    plan_ipcv,
    select_tokens,
    shrink_cu_seqlens,
    token_scores,
)
from .dispatch import available_backends, backend_names

__all__ = [
    "available_backends",
    "backend_for",
    "backend_names",
    "knn",
    "ngr_attention",
    "ngr_reconstruct",
    "plan_ipcv",
    "select_tokens",
    "shrink_cu_seqlens",
    "token_scores",
]
