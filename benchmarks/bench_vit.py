"""End-to-end vision-tower benchmark: ``python benchmarks/bench_vit.py --suite cpu``.

The same as ``python -m ipcv_kernels bench`` (the code lives in ``ipcv_kernels.bench.vit``); this
file is only a script entry point. ``--help`` lists the options; results go to
``./ipcv_results/vit`` unless ``--out`` names a directory.
"""

import sys

from ipcv_kernels.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
