"""The Triton backend of the IPCV ops: one module per op, holding its ``@triton.jit`` kernels, their
launcher and the registration of its ``"triton"`` backend.

- ``knn.py``: fused distance + running top-k (``knn``).
- ``ngr_reconstruct.py``: NGR reconstruction, also written into a full-length buffer with a fused
  LayerNorm (``ngr_reconstruct``, ``ngr_restore``).
- ``ngr_attention.py``: varlen flash attention and the rotary pass (``ngr_attention``; declares
  ``fuses={"rotary", "q_gather"}``).
- ``_backend.py``: what the launchers share, and ``register_triton_backends``.

The launchers choose tiles and grids, handle contiguity, and map segments to rows on the device,
so that no launcher reads a device value on the host. (``select_tokens`` and ``plan`` on the
device are the vectorised-PyTorch backend ``"vectorized"`` of ``ipcv_kernels.ops``, whose
planning takes its neighbours from the Triton ``knn`` on CUDA.)

Registration: the ``"triton"`` backends run on ``"cuda"`` devices, where ``auto`` picks them. On
the CPU, Triton kernels only run under the interpreter (``TRITON_INTERPRET=1``, set before
``triton`` is imported): tests call the launchers directly, or call
``register_triton_backends(("cuda", "cpu"))`` to route ``backend="triton"`` of the public ops
there (and ``register_triton_backends()`` afterwards to restore the CUDA-only table).

Dtypes: fp16/bf16/fp32 run the kernels; fp64 (an oracle dtype, no fast path needed) runs the
reference, as do ``knn`` with ``k > MAX_KERNEL_K`` and attention with ``Dh > MAX_HEAD_DIM``.

Every module here imports ``triton``; the package ``ipcv_kernels/__init__.py`` imports this package
only when triton is installed (``pip install ipcv_kernels[triton]``); ``ipcv_kernels.ops`` never
does (this package is the layer above it).
"""

from . import knn, ngr_attention, ngr_reconstruct  # noqa: F401  (each registers its backend)
from ._backend import register_triton_backends

__all__ = ["register_triton_backends"]
