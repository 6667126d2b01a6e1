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


@pytest.fixture(scope="session")
def qwen2_vl_path(tmp_path_factory):
    from ipcv_kernels.vllm.testing import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl"))


@pytest.fixture(scope="session")
def qwen2_5_vl_path(tmp_path_factory):
    from ipcv_kernels.vllm.testing import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl"))


@pytest.fixture(scope="session")
def qwen3_vl_path(tmp_path_factory):
    from ipcv_kernels.vllm.testing import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("qwen3_vl"), "qwen3_vl"))


@pytest.fixture(scope="session")
def internvl_path(tmp_path_factory):
    from ipcv_kernels.vllm.testing import build_checkpoint

    return str(build_checkpoint(tmp_path_factory.mktemp("internvl"), "internvl"))
