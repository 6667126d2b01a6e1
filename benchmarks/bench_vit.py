"""End-to-end vision-tower benchmark (issue 5): ``python benchmarks/bench_vit.py --suite cpu``.

The code lives in ``ipcv_kernels.bench.vit`` so that ``python -m ipcv_kernels bench`` runs the
same thing; this file is only the script entry point. ``--help`` lists the options.
"""

import sys

from ipcv_kernels.bench.vit import main

if __name__ == "__main__":
    sys.exit(main())
