"""vLLM benchmark: ``python benchmarks/bench_vllm.py`` in an environment with vLLM.

The same as ``python -m ipcv_kernels bench-vllm`` (the code lives in ``ipcv_kernels.bench.vllm``);
this file is only a script entry point. ``--help`` lists the options; results go to
``./ipcv_results/vllm`` unless ``--out`` names a directory.
"""

import sys

from ipcv_kernels.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench-vllm", *sys.argv[1:]]))
