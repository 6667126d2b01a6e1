"""Build script: pure-Python package plus the optional compiled extension ``ipcv_kernels._C`` from ``csrc/``.

The extension registers ``torch.ops.ipcv.*`` (CPU kernels; CUDA kernels too in a CUDA build) and
``backend="cpp"`` of the public ops. It is never required:

- ``IPCV_SKIP_BUILD=1`` skips it; so does a missing torch C++ toolchain at build time. A failed
  compile is reported as a warning and the package installs as pure Python, unless
  ``IPCV_REQUIRE_BUILD=1`` (CI sets it) turns the failure into an error.
- The CUDA sources are compiled when the installed torch is a CUDA build and a CUDA toolkit is
  found (``CUDA_HOME``/``nvcc``); ``IPCV_FORCE_CUDA=1`` forces them, ``IPCV_FORCE_CUDA=0`` disables
  them. Nothing probes the GPU itself.

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
already installed (an isolated build would fetch another torch wheel). ``MAX_JOBS`` bounds ninja's
parallel compiles.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/register.cpp", "csrc/checks.cpp", "csrc/cpu/kernels.cpp", "csrc/module.cpp"]
CUDA_SOURCES = ["csrc/cuda/kernels.cu"]
CXX_FLAGS = ["-O3", "-fopenmp", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]


def _want_cuda(cpp_extension, torch) -> bool:
    forced = os.environ.get("IPCV_FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension_config() -> dict:
    if os.environ.get("IPCV_SKIP_BUILD") == "1":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "ipcv_kernels: torch is not importable at build time; installing without the compiled ops", file=sys.stderr
        )
        return {}

    with_cuda = _want_cuda(cpp_extension, torch)
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            "ipcv_kernels._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("IPCV_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = cpp_extension.CppExtension(
            "ipcv_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"]
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Warns instead of failing when the compiler is missing or the compile fails (unless required)."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as error:
                if os.environ.get("IPCV_REQUIRE_BUILD") == "1":
                    raise
                self.extensions = []  # nothing to copy or install afterwards
                print(
                    f"ipcv_kernels: building the compiled ops failed ({error}); installing the pure-Python "
                    "package (backend='cpp' will be unavailable). Set IPCV_REQUIRE_BUILD=1 to make this an error.",
                    file=sys.stderr,
                )

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_config())
