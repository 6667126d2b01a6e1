"""A selector from another library, chosen by name through vLLM's ``hf_overrides``: the test
package ``tests/selector_plugin`` is pip-installed into a temporary directory on the path, and
the engine's model, patched from ``{"ipcv": {..., "selection": "plugin_l1"}}``, scores its tokens
with it (vLLM's own Qwen2-VL, CPU, in-process as every vLLM test here); the image's tokens are
pruned; so are they with the built-in ``"uniform"``, which needs the adapter's grid."""

from __future__ import annotations

import numpy as np
import pytest

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from PIL import Image
from selector_plugin.installed import SELECTOR_NAME, install_plugin

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels import selectors
from ipcv_kernels.vllm.testing import ENGINE, shutdown_engine

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3, "selection": SELECTOR_NAME}
PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8"


def test_entry_point_selector_through_hf_overrides(checkpoint, tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    monkeypatch.syspath_prepend(str(install_plugin(tmp_path)))
    monkeypatch.setattr(selectors, "_registry", dict(selectors.BUILTIN_SELECTORS))
    monkeypatch.setattr(selectors, "_entry_points_loaded", False)
    llm = LLM(model=checkpoint("qwen2_vl"), hf_overrides={"ipcv": SETTINGS}, **ENGINE)
    try:
        (patch_config,) = llm.apply_model(lambda model: ik.get_ipcv_patch(model).config)
        assert patch_config.selection == SELECTOR_NAME
        import ipcv_selector_plugin

        before = ipcv_selector_plugin.calls
        pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
        request = {"prompt": PROMPT, "multi_modal_data": {"image": Image.fromarray(pixels)}}
        params = SamplingParams(max_tokens=2, temperature=0.0)
        assert len(llm.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids) == 2
        assert ipcv_selector_plugin.calls > before
        (tokens,) = llm.apply_model(lambda model: ik.get_ipcv_patch(model).last_tokens_per_block)
        assert tokens[2] < tokens[0]  # the image was pruned at block P = 2
        # A built-in that needs the grid: vLLM's Qwen2-VL adapter gives it (merge-unit order).
        uniform = ik.IPCVConfig(**{**SETTINGS, "selection": "uniform"})
        llm.apply_model(lambda model: ikv.apply_ipcv(model, uniform))
        pixels = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
        request = {"prompt": PROMPT, "multi_modal_data": {"image": Image.fromarray(pixels)}}
        assert len(llm.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids) == 2
        (tokens,) = llm.apply_model(lambda model: ik.get_ipcv_patch(model).last_tokens_per_block)
        assert tokens[2] < tokens[0]
    finally:
        shutdown_engine(llm)
