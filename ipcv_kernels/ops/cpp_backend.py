"""``backend="cpp"``: the compiled ops of ``csrc/`` (``torch.ops.ipcv.*``), when the extension is built.

Importing this module loads the extension ``ipcv_kernels._C`` (or, for a CMake development build,
the library named by ``IPCV_CPP_LIBRARY``), has the op modules register their fakes for
``torch.ops.ipcv.*`` (``_custom_op.compiled_extension_loaded``) so they trace under
``torch.compile``, and registers backend ``"cpp"`` of ``knn``, ``ngr_reconstruct``,
``ngr_restore`` (one compiled pass on the CPU; on CUDA the reference's scatters around the compiled
reconstruction),
``select_tokens`` and ``plan`` on the CPU, and on CUDA when the build has CUDA kernels. Without the
extension it stays silent: ``auto`` skips ``"cpp"`` and ``backend="cpp"`` raises a
``RuntimeError`` saying how to build it.

``auto`` (``dispatch.AUTO_ORDER``) picks ``"cpp"`` on the CPU; on CUDA it ranks the CUDA kernels,
compiled but not yet run on a GPU, below Triton and the device-side ``vectorized`` planning, so
they run there where those are missing (no Triton: ``knn``, ``ngr_reconstruct``, ``ngr_restore``)
or where ``backend="cpp"`` is named.

``select_tokens`` and ``plan`` pass the compiled ops the per-item keep counts
(``reference.keep_counts``: one host read of ``cu_items``), so the count rule lives only in Python.
"""

from __future__ import annotations

import importlib
import os

import torch

from ..reference import IPCVPlan, TokenSelection, keep_counts, ngr_restore_reference
from ._custom_op import compiled_extension_loaded
from .dispatch import Backend, register_backend

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository root (a C++ compiler and ninja "
    "needed; IPCV_SKIP_BUILD must not be 1), or point IPCV_CPP_LIBRARY at a CMake build's libipcv_ops.so"
)


def _load_extension() -> str | None:
    """Load the compiled ops; ``None`` on success, else the reason they are unavailable."""
    library = os.environ.get("IPCV_CPP_LIBRARY")
    try:
        if library:
            torch.ops.load_library(library)
        else:
            importlib.import_module("ipcv_kernels._C")
    except (ImportError, OSError) as error:
        return f"the compiled extension is not available ({error}); {BUILD_HINT}"
    return None


UNAVAILABLE_REASON = _load_extension()


def _unavailable() -> str | None:
    return UNAVAILABLE_REASON


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    return UNAVAILABLE_REASON is None and torch._C._dispatch_has_kernel_for_dispatch_key("ipcv::plan", "CUDA")


def knn_cpp(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    cu_query: torch.Tensor | None = None,
    cu_ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Streaming tiled kNN (see ``knn_reference`` for the contract): int64 ``[Nq, k]``."""
    return torch.ops.ipcv.knn(query, ref, k, cu_query, cu_ref)


def ngr_reconstruct_cpp(
    base_drop: torch.Tensor, kept: torch.Tensor, base_kept: torch.Tensor, neighbors: torch.Tensor
) -> torch.Tensor:
    """NGR reconstruction (see ``ngr_reconstruct_reference``): ``[Nd, D]`` in ``base_drop``'s dtype."""
    return torch.ops.ipcv.ngr_reconstruct(base_drop, kept, base_kept, neighbors)


def ngr_restore_cpp(
    out: torch.Tensor,
    kept: torch.Tensor,
    base_drop: torch.Tensor,
    base_kept: torch.Tensor,
    keep: torch.Tensor,
    drop: torch.Tensor,
    neighbors: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    normed_out: torch.Tensor | None = None,
) -> None:
    """``out[keep] = kept``, ``out[drop] = NGR reconstruction`` (see ``ngr_restore_reference``).

    On the CPU, with a contiguous ``out`` and int64 rows (what the plan gives), one compiled pass
    writes both row sets; otherwise (CUDA, int32 rows, a strided ``out``) the reference's scatters
    run around the compiled reconstruction.
    """
    if out.device.type == "cpu" and out.is_contiguous() and keep.dtype == drop.dtype == neighbors.dtype == torch.int64:
        torch.ops.ipcv.ngr_restore(
            out, kept, base_drop, base_kept, keep, drop, neighbors, norm_weight, norm_bias, norm_eps, normed_out
        )
        return
    ngr_restore_reference(
        out,
        kept,
        base_drop,
        base_kept,
        keep,
        drop,
        neighbors,
        norm_weight,
        norm_bias,
        norm_eps,
        normed_out,
        reconstruct=ngr_reconstruct_cpp,
    )


def select_tokens_cpp(scores: torch.Tensor, cu_items: torch.Tensor, ratio: float) -> TokenSelection:
    """Per-item top-k selection (see ``select_tokens_reference``); the keep counts come from Python."""
    return TokenSelection(*torch.ops.ipcv.select_tokens(scores, cu_items, keep_counts(cu_items, ratio)))


def plan_cpp(
    x_before: torch.Tensor,
    x_after: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
) -> IPCVPlan:
    """The whole planning step in one compiled call (see ``plan_reference``); the keep counts come from Python."""
    counts = keep_counts(cu_items, ratio)
    return IPCVPlan(*torch.ops.ipcv.plan(x_before, x_after, cu_items, cu_seqlens, counts, num_neighbors))


if UNAVAILABLE_REASON is None:
    compiled_extension_loaded()

_DEVICES = ("cpu", "cuda") if UNAVAILABLE_REASON is not None or has_cuda_kernels() else ("cpu",)
for _op, _fn in (
    ("knn", knn_cpp),
    ("ngr_reconstruct", ngr_reconstruct_cpp),
    ("ngr_restore", ngr_restore_cpp),
    ("select_tokens", select_tokens_cpp),
    ("plan", plan_cpp),
):
    register_backend(_op, Backend("cpp", _fn, _DEVICES, is_available=_unavailable))
