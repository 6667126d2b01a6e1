"""The Triton kernels compile for a real GPU (sm_90, H100) with the launchers' own tile choices,
fit the shared-memory budget and spill no registers, without needing a GPU. The interpreter never compiles, so this
is where compile-only errors (loop-carried type changes, dot shape limits, shared memory) show.

Each launcher is called as usual with tiny CPU tensors, but its kernel object is replaced by a
stand-in that turns the launch's arguments into a signature and runs Triton's ahead-of-time
compiler down to a cubin (ptxas ships with triton); cuobjdump (shipped too) reads its registers
and stack frame. Triton must be imported in compile mode for
that, so the checks run in a subprocess without ``TRITON_INTERPRET`` (this file's ``__main__``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two programs per SM (227 KiB each at most on an H100): the launchers aim below half.
SHARED_BUDGET = 116 * 1024
POINTER_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


# Further Triton installs to compile with (``pip install --target DIR triton==X``), separated by
# os.pathsep: CI adds the GPU image's Triton, whose register allocation differs from the newest.
EXTRA_TRITON_PATHS = [path for path in os.environ.get("IPCV_EXTRA_TRITON_PATHS", "").split(os.pathsep) if path]


@pytest.mark.parametrize("triton_path", [None, *EXTRA_TRITON_PATHS], ids=["installed", *EXTRA_TRITON_PATHS])
def test_kernels_compile_for_h100(triton_path):
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_path, env.get("PYTHONPATH")]))
    probe = "import pathlib, triton; print(pathlib.Path(triton.__file__).parent, triton.__version__)"
    where = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    package, version = where.stdout.split()
    tools = Path(package) / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip(f"triton {version} has no NVIDIA toolchain in {tools}")
    result = subprocess.run(
        [sys.executable, str(Path(__file__))], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"triton {version} ({package}):\n" + result.stdout + result.stderr


class AheadOfTimeCompiler:
    """Stands in for ``kernel[grid](*args, **constexprs)``: compiles for sm_90 instead of launching."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.shared: list[int] = []

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, num_warps: int = 4, num_stages: int = 3, **constexprs) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        def arg_type(value):
            if isinstance(value, torch.Tensor):
                return POINTER_TYPES[value.dtype]
            if isinstance(value, float):
                return "fp32"
            return "i32" if -(2**31) <= value < 2**31 else "i64"

        names = [p.name for p in self.kernel.params if not p.is_constexpr]
        signature = {name: arg_type(value) for name, value in zip(names, args, strict=True)}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        options = {"num_warps": num_warps, "num_stages": num_stages}
        binary = triton.compile(
            ASTSource(self.kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options
        )
        assert binary.asm["cubin"], "ptxas produced no cubin"
        self.shared.append(binary.metadata.shared)
        usage = resource_usage(binary.asm["cubin"])
        constants = {k: v for k, v in constexprs.items() if k.isupper()}
        print(f"{self.kernel.__name__} {constants} {options}: {binary.metadata.shared} B shared, {usage}")
        assert binary.metadata.shared <= SHARED_BUDGET, f"{binary.metadata.shared} B of shared memory"
        # A stack frame without calls means spilled registers.
        assert usage["STACK"] == 0, f"register spills: {usage}"
        # 16-bit tiles of 64+ rows are meant for Hopper's warpgroup MMA; a config change that falls
        # back to mma.sync would keep working at a fraction of the tensor-core rate.
        rows = max(constexprs.get("BLOCK_M", 0), constexprs.get("BLOCK_Q", 0))
        half_precision = any(isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) for a in args)
        if half_precision and rows >= 64 and num_warps % 4 == 0:
            assert "wgmma" in binary.asm["ptx"], "no warpgroup MMA in a 16-bit tile of 64+ rows"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ... of a cubin, as ``cuobjdump -res-usage`` reports them."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([str(tool), "-res-usage", handle.name], capture_output=True, text=True, check=True)
    line = next(line for line in report.stdout.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in (field.split(":") for field in line.split()[:2])}


def compile_every_launch_configuration() -> None:
    from conftest import offsets

    from ipcv_kernels.triton import knn, ngr_attention, ngr_reconstruct

    # Each launcher looks its kernel up in its own module at launch time.
    for module, name in (
        (knn, "knn_kernel"),
        (ngr_attention, "varlen_attention_kernel"),
        (ngr_attention, "rotary_kernel"),
        (ngr_reconstruct, "ngr_reconstruct_kernel"),
    ):
        setattr(module, name, AheadOfTimeCompiler(getattr(module, name)))
    for dtype, k in ((torch.bfloat16, 10), (torch.float32, 10), (torch.float16, knn.MAX_KERNEL_K)):
        knn.knn_triton(torch.zeros(5, 1280, dtype=dtype), torch.zeros(7, 1280, dtype=dtype), k)
    for dtype, head_dim, rotary in (
        (torch.float16, 64, False),
        (torch.bfloat16, 80, True),
        (torch.bfloat16, 96, False),
        (torch.bfloat16, 112, False),
        (torch.bfloat16, 128, True),
        (torch.bfloat16, 160, False),
        (torch.bfloat16, 192, False),
        (torch.bfloat16, 256, True),
        (torch.float32, 64, False),
        (torch.float32, 80, True),
        (torch.float32, 128, False),
        (torch.float32, 256, False),
    ):
        q = torch.zeros(6, 2, head_dim, dtype=dtype)
        table = (torch.ones(6, head_dim), torch.zeros(6, head_dim)) if rotary else None
        rows = torch.arange(6) if rotary else None
        ngr_attention.ngr_attention_triton(q, q, q, offsets([6]), offsets([6]), rotary=table, q_rows=rows)
    rows = torch.zeros(4, 1280, dtype=torch.bfloat16)
    neighbors = torch.zeros(4, 10, dtype=torch.int64)
    ngr_reconstruct.ngr_reconstruct_triton(rows, rows, rows, neighbors)
    norm = torch.nn.LayerNorm(1280).to(torch.bfloat16)
    full = torch.zeros(8, 1280, dtype=torch.bfloat16)
    keep, drop = torch.arange(4), torch.arange(4, 8)
    ngr_reconstruct.ngr_restore_triton(
        full, rows, rows, rows, keep, drop, neighbors, norm.weight, norm.bias, 1e-6, full.clone()
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's helpers
    compile_every_launch_configuration()
