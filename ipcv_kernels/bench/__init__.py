"""Benchmark support shipped with the package: the shared harness, model presets and the
end-to-end vision-tower benchmark (``python -m ipcv_kernels bench`` / ``benchmarks/bench_vit.py``).

Optional dependencies (``pip install ipcv_kernels[bench]``): matplotlib for plots, tqdm for
progress bars; both are imported only when used.
"""
