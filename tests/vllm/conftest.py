"""vLLM test setup. The tests run only where vLLM imports (its own environment, see .ci/run);
elsewhere each module skips itself, so the main suite is unaffected.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with a small CPU KV cache; the
model is a tiny Qwen2-VL saved with seeded random weights, which transformers loads too.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Tensor-parallel CPU workers bind their OpenMP threads to one NUMA node each by default, which a
# one-node machine refuses; the tests only need them to run. Set before any engine starts (vLLM
# caches its environment once the first in-process engine is up).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


@pytest.fixture(scope="session", autouse=True)
def in_process_engines_after_numba():
    """In-process engines start after numba is imported (Kimi-K2.5's processor imports it):
    ``ipcv_kernels.vllm.testing.allow_in_process_engines_after_numba``."""
    from ipcv_kernels.vllm.testing import allow_in_process_engines_after_numba

    allow_in_process_engines_after_numba()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)``: the path of a tiny saved ``family`` checkpoint
    (``ipcv_kernels.vllm.testing.build_checkpoint``, seed 0), built once per session."""
    from ipcv_kernels.vllm.testing import build_checkpoint

    paths: dict[str, str] = {}

    def path(family: str) -> str:
        if family not in paths:
            paths[family] = str(build_checkpoint(tmp_path_factory.mktemp(family), family))
        return paths[family]

    return path
