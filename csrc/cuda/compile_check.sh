#!/usr/bin/env bash
# Compile-only check of the CUDA sources with nvcc, for machines without a GPU (CI).
#
# Compiles cuda/kernels.cu to an object file and checks register.cpp with the CUDA registrations
# enabled, against the headers of the installed torch. A CPU wheel of torch ships the c10/cuda
# headers but not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; its one line is supplied
# from a temporary directory. Nothing is linked or run. Usage: bash csrc/cuda/compile_check.sh [nvcc]
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC="${1:-${NVCC:-nvcc}}"
ARCH="${IPCV_CUDA_ARCH:-sm_80}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$work/c10/cuda/impl/cuda_cmake_macros.h"

read -r -a includes < <(python -c "from torch.utils import cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
flags=(-std=c++20 -O3 --expt-relaxed-constexpr -DTORCH_ASSERT_ONLY_METHOD_OPERATORS -DIPCV_WITH_CUDA "${includes[@]}" "-I$work")

"$NVCC" "${flags[@]}" -arch="$ARCH" -Xcompiler -fPIC -c csrc/cuda/kernels.cu -o "$work/kernels.o"
"$NVCC" "${flags[@]}" -Xcompiler -fsyntax-only -c csrc/register.cpp -o "$work/register.o"
echo "CUDA sources compile ($NVCC, $ARCH)"
