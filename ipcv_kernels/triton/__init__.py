"""``@triton.jit`` kernels of the IPCV ops (kernels only: launchers live in ``ipcv_kernels.ops.triton_backend``).

Its modules import ``triton``; the op layer imports them only when triton is installed.
"""
