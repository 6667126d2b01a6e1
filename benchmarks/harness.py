"""The shared benchmark harness, for scripts in this folder (``from harness import ...``).

The implementation lives in the package, ``ipcv_kernels.bench.harness`` (so that
``python -m ipcv_kernels bench`` can use it too); this module re-exports it unchanged.
"""

from ipcv_kernels.bench.harness import *  # noqa: F403
from ipcv_kernels.bench.harness import __all__  # noqa: F401
