"""Readable pure-PyTorch references, one per op, written from the spec (``docs/spec.md``).

Tests and benchmarks import these as the oracle for every fast path; ``backend="torch"`` of the
public ops runs them directly.
"""

from .attention import ngr_attention_reference, unfused_attention_inputs
from .knn import knn_reference
from .plan import IPCVPlan, plan_reference
from .reconstruct import ngr_reconstruct_reference, ngr_restore_reference
from .selection import (
    TokenSelection,
    keep_count,
    keep_counts,
    select_tokens_reference,
    shrink_cu_seqlens_reference,
    token_scores_reference,
)

__all__ = [
    "IPCVPlan",
    "TokenSelection",
    "keep_count",
    "keep_counts",
    "knn_reference",
    "ngr_attention_reference",
    "ngr_reconstruct_reference",
    "ngr_restore_reference",
    "plan_reference",
    "select_tokens_reference",
    "shrink_cu_seqlens_reference",
    "token_scores_reference",
    "unfused_attention_inputs",
]
