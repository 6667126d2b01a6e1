"""Benchmark support shipped with the package (``python -m ipcv_kernels bench`` / ``bench-vllm``, the demo and
``benchmarks/bench_*.py``):

- ``harness``: timing, spread and noise verdicts, peak memory, run metadata, result files, plots,
  progress bars; the default output directory ``./ipcv_results/<benchmark>``;
- ``presets``: named tower shapes and benchmark suites;
- ``towers``: a preset's tower with seeded random weights, or a local checkpoint's vision tower
  (any family of the family table);
- ``calls``: how a tower of each family is called, its cases and its FLOP model;
- ``variants``: the compared variants (unpatched, the paper's formulation, IPCV) by name;
- ``vit``: the end-to-end vision-tower benchmark (cases, checks, the run, the ``bench`` flags);
- ``report``: its CSV rows, markdown and plot;
- ``vllm``: the vLLM benchmark (``python -m ipcv_kernels bench-vllm``): vLLM's vision-encoder time
  and time to first token with and without IPCV, in one engine; needs vLLM.

Optional dependencies (``pip install ipcv_kernels[bench]``): matplotlib for plots, tqdm for
progress bars; both are imported only when used.
"""
