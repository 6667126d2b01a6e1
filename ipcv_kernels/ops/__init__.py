"""Public op layer. Importing it defines every op and registers its PyTorch and compiled backends;
the Triton backends (``ipcv_kernels.triton``, a layer above, importing the registry) are registered
by importing ``ipcv_kernels``, which every import of a subpackage does first.

All ops are inference-only and autograd-free: they run under ``torch.no_grad()``, register no
backward, and their outputs never carry a grad history. Every public op validates its inputs
(shape, dtype, device, offsets) and raises ``TypeError``/``ValueError`` naming the argument, unless
called with ``skip_check=True``, then calls its ``torch.ops.ipcv_kernels.*`` custom op (in eager
mode its implementation directly, see ``_custom_op.IPCVOp``), which runs the backend chosen by
``backend``: ``"auto"`` (the first backend available for the inputs' device in
``dispatch.AUTO_ORDER``, see ``available_backends``), ``"torch"`` (the pure-PyTorch reference of
``ipcv_kernels.reference``), or an op-specific fast path (``"sdpa"``, ``"flash_attn"``,
``"torch_varlen"`` for attention; ``"vectorized"`` for selection and planning; ``"triton"``,
``"cpp"`` where installed / built).

Layout (one op, one module):

- ``knn.py``, ``ngr_reconstruct.py``, ``ngr_restore.py``, ``ngr_attention.py``, ``selection.py``
  (``token_scores``, ``select_tokens``, ``shrink_cu_seqlens``), ``plan.py`` (``plan_ipcv``): each
  holds the public function, its input checks, its custom op and fake (``_custom_op.ipcv_op``)
  and its reference backend ``"torch"``. A new op is a new module here (imported below), its
  reference in ``ipcv_kernels/reference/``, and a test module ``tests/ops/test_<op>.py`` over the backends.
- ``dispatch.py``: the registry (``Backend``, ``register_backend``, ``resolve_backend`` and its
  cache, ``AUTO_ORDER``: ``auto``'s one ranking of every backend per device type, capabilities in
  ``Backend.fuses``). ``_custom_op.py``: defines a custom op and its
  fake, for ``ipcv_kernels::<op>`` and the compiled ``ipcv::<op>``. Checks shared by several ops
  live in ``ipcv_kernels/_validation.py``.
- Backends register themselves per op with ``register_backend``: ``attention_backends.py``
  (``"sdpa"``, ``"flash_attn"``, ``"torch_varlen"``), ``cpp_backend.py`` (``"cpp"``: the compiled
  ``csrc/`` extension, optional), ``vectorized_backend.py`` (``"vectorized"``: ``select_tokens``
  and ``plan`` as whole-tensor PyTorch on the device) and the ``ipcv_kernels.triton`` package (``"triton"``: one module
  per op with its kernels, launcher and registration; needs the triton package; imported by
  ``ipcv_kernels/__init__.py``). A new backend is a new module that registers its functions and
  is imported below (or, above the op layer, by the package) and adds its name to ``AUTO_ORDER``
and to the tests' ``BACKENDS`` list (``tests/conftest.py``); a new Triton kernel goes into
  ``ipcv_kernels/triton/<op>.py``.

Shape names, the same in every op's docstring: ``n`` all tokens of the packed batch, ``Nk`` the
kept and ``Nd`` the dropped ones (``n = Nk + Nd``), ``Nq`` / ``Nkv`` query and key/value rows of
attention (``Nq`` also the query rows of ``knn``, ``Nr`` its reference rows), ``B`` items or
segments, ``S`` attention segments, ``D`` the feature width, ``H`` heads of ``Dh`` columns, ``k``
neighbours.

Nothing here queries a device at import: backends answer ``is_available`` when asked.
"""

from . import (
    attention_backends,  # noqa: F401  (sdpa / flash_attn / torch_varlen; the libraries load at call time)
    cpp_backend,  # noqa: F401  (backend "cpp" when the compiled extension csrc/ is built)
    vectorized_backend,  # noqa: F401  (select_tokens / plan as whole-tensor PyTorch on the device)
)
from .dispatch import available_backends, backend_for, backend_names
from .knn import knn
from .ngr_attention import ngr_attention
from .ngr_reconstruct import ngr_reconstruct
from .ngr_restore import ngr_restore
from .plan import plan_ipcv
from .selection import select_tokens, shrink_cu_seqlens, token_scores

__all__ = [
    "available_backends",
    "backend_for",
    "backend_names",
    "knn",
    "ngr_attention",
    "ngr_reconstruct",
    "ngr_restore",
    "plan_ipcv",
    "select_tokens",
    "shrink_cu_seqlens",
    "token_scores",
]
