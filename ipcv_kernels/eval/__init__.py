"""Evaluation entry points: a request runner for any supported family with IPCV and LLM-side
pruning, and its lmms-eval adapter (``ipcv_kernels.eval.lmms_eval_model``, model name ``ipcv``,
also registered as ``ipcv_qwen2_vl``; loaded by lmms-eval through the ``lmms_eval.models`` entry
point; needs ``pip install lmms-eval``).
"""

from .runner import MultimodalRunner
from .settings import build_settings

__all__ = ["MultimodalRunner", "build_settings"]
