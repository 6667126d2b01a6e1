"""Evaluation entry points: a request runner for Qwen2-VL with IPCV and LLM-side pruning, and
its lmms-eval adapter (``ipcv_kernels.eval.lmms_eval_model``, model name ``ipcv_qwen2_vl``,
loaded by lmms-eval through the ``lmms_eval.models`` entry point; needs ``pip install lmms-eval``).
"""

from .runner import Qwen2VLRunner
from .settings import build_settings

__all__ = ["Qwen2VLRunner", "build_settings"]
