"""vLLM test setup: these tests run only where vLLM imports (its own environment, see .ci/run);
elsewhere the whole folder is skipped, so the main suite is unaffected.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with a small CPU KV cache; the
model is a tiny Qwen2-VL saved with seeded random weights, which transformers loads too.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in their own environment)")

# The engine settings every test uses (the list: fp32, eager, no prefix caching, no
# processor cache so every image is processed and encoded anew).
ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    enable_prefix_caching=False,
    mm_processor_cache_gb=0,
    max_model_len=512,
    max_num_seqs=4,
    seed=0,
    limit_mm_per_prompt={"image": 4, "video": 1},
)


@pytest.fixture(scope="session")
def qwen2_vl_path(tmp_path_factory):
    from ipcv_kernels.vllm.testing import build_qwen2_vl_checkpoint

    return str(build_qwen2_vl_checkpoint(tmp_path_factory.mktemp("qwen2_vl")))
