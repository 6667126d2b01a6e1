"""Benchmark support shipped with the package (``python -m ipcv_kernels bench`` / ``bench-vllm``, the demo and
``benchmarks/bench_*.py``):

- ``measure``: timing with its spread, speedups round by round and their noise verdict, peak
  memory, host-device synchronisations;
- ``environment``: what a run records about where it ran (device, versions, host, revision);
- ``results``: result files (JSON, CSV, markdown, plots), the default output directory
  ``./ipcv_results/<benchmark>``; ``progress``: progress bars;
- ``presets``: benchmark suites (the tower shapes are the family table's presets);
- ``towers``: a preset's tower with seeded random weights, or a local checkpoint's vision tower
  (any family of the family table);
- ``calls``: how a tower of each call kind is called, its cases and its FLOP model;
- ``variants``: the compared variants (unpatched, the paper's formulation, IPCV) by name;
- ``vit``: the end-to-end vision-tower benchmark (cases, checks, the run, the ``bench`` flags);
- ``report``: its CSV rows, markdown and plot;
- ``vllm``: the vLLM benchmark (``python -m ipcv_kernels bench-vllm``): vLLM's vision-encoder time
  and time to first token with and without IPCV, in one engine; needs vLLM. One module per
  concern: ``cases``, ``engine``, ``checks``, ``timing``, ``report``, ``cli``.

Optional dependencies (``pip install ipcv_kernels[bench]``): matplotlib for plots, tqdm for
progress bars; both are imported only when used.
"""
