"""``@triton.jit`` kernels of the IPCV ops (kernels only: launchers live in ``ipcv_kernels.ops.triton_backend``).

Importing this package imports ``triton``; the op layer imports it only when triton is installed.
"""
