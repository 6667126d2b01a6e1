"""Benchmark of the compiled planning step and ``knn``: ``python benchmarks/bench_plan.py``.

Two parts, each checked for correctness before it is timed:

- ``plan``: the whole IPCV planning step (scores, per-item selection, neighbours, kept offsets)
  through ``plan_ipcv`` with ``backend="cpp"`` (one compiled call) and ``backend="torch"`` (the
  pure-PyTorch reference), interleaved in the same run, for batches of images given as
  ``BxN`` (``B`` images of ``N`` tokens; default ``8x1024`` and ``32x256``).
- ``knn``: one item of ``--knn-tokens`` tokens split at ``--ratio`` into dropped (queries) and
  kept (references) rows, the IPCV neighbour search: ``torch.ops.ipcv.knn`` (streaming, tiled)
  against ``torch.cdist`` + ``topk`` (which materialises the whole drop x keep matrix): time and
  peak extra memory of each (on the CPU: the resident-set high-water mark, see ``ipcv_kernels.bench.measure``).

Results: ``plan_<device>.json`` (device, versions, every sample), ``.csv`` and ``.md`` in ``--out``
(default ``./ipcv_results/plan``; the committed results are regenerated with ``--out
benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import ipcv_kernels as ik
from ipcv_kernels._help_text import help_summary
from ipcv_kernels.bench.environment import configure_threads, environment, environment_markdown, load_average
from ipcv_kernels.bench.measure import measure_peak_memory, time_interleaved
from ipcv_kernels.bench.results import Column, ResultFiles, default_out, markdown_table
from ipcv_kernels.ops import cpp_backend
from ipcv_kernels.reference import keep_count, knn_reference
from ipcv_kernels.testing import assert_close

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The targets: speed-up of the planning step per batch shape; knn memory ratio and time.
PLAN_TARGETS = {(8, 1024): 1.4, (32, 256): 2.0}
KNN_MEMORY_TARGET = 0.25


def parse_batch(text: str) -> tuple[int, int]:
    images, tokens = text.lower().split("x")
    return int(images), int(tokens)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=help_summary(__doc__))
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out("plan"),
        help="result folder, relative to the current directory (--out benchmarks/results rewrites the committed "
        "results; default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batches", type=parse_batch, nargs="+", default=[(8, 1024), (32, 256)], help="BxN")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--neighbors", type=int, default=10)
    parser.add_argument("--knn-tokens", type=int, default=16384, help="tokens of the one-item knn case (0: skip)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--knn-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--knn-memory", choices=["cpp", "cdist_topk"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stem", default=None, help="result file name stem (default plan_<device>)")
    return parser.parse_args(argv)


def neighbour_distances(query: torch.Tensor, ref: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exact fp64 squared distances of the chosen neighbours (0 in ``-1`` slots)."""
    chosen = ref.double()[index.clamp_min(0)]
    dist = ((query.double()[:, None, :] - chosen) ** 2).sum(-1)
    return torch.where(index >= 0, dist, torch.zeros_like(dist))


def check_plan(got: ik.IPCVPlan, expected: ik.IPCVPlan, x_after: torch.Tensor) -> None:
    """Selection and offsets exactly; neighbours by their distances (ties may be broken either way)."""
    for name in ("keep", "drop", "cu_keep", "cu_drop", "cu_seqlens_kept"):
        if not torch.equal(getattr(got, name).cpu(), getattr(expected, name).cpu()):
            raise AssertionError(f"plan: {name} differs from the reference")
    query, ref = x_after[expected.drop].cpu(), x_after[expected.keep].cpu()
    assert_close(
        neighbour_distances(query, ref, got.neighbors.cpu()),
        neighbour_distances(query, ref, expected.neighbors.cpu()),
        dtype=torch.float32,
    )


def plan_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    for images, tokens in args.batches:
        generator = torch.Generator().manual_seed(images * tokens)
        n = images * tokens
        x_before = torch.randn(n, args.width, generator=generator)
        x_after = (x_before + 0.5 * torch.randn(n, args.width, generator=generator)).to(device, dtype)
        x_before = x_before.to(device, dtype)
        cu = torch.arange(0, n + 1, tokens, dtype=torch.int32, device=device)

        def run(backend: str, x_before=x_before, x_after=x_after, cu=cu) -> ik.IPCVPlan:
            return ik.plan_ipcv(x_before, x_after, cu, cu, args.ratio, args.neighbors, backend=backend)

        check_plan(run("cpp"), run("torch"), x_after)
        timings = time_interleaved(
            {"torch": lambda run=run: run("torch"), "cpp": lambda run=run: run("cpp")},
            device,
            warmup=args.warmup,
            repeats=args.repeats,
        )
        speedup = timings["torch"].median_ms / timings["cpp"].median_ms
        target = PLAN_TARGETS.get((images, tokens))
        rows.append(
            {
                "case": "plan",
                "shape": f"{images}x{tokens}",
                "images": images,
                "tokens_per_image": tokens,
                "width": args.width,
                "ratio": args.ratio,
                "k": args.neighbors,
                "dtype": str(dtype),
                "torch_median_ms": timings["torch"].median_ms,
                "cpp_median_ms": timings["cpp"].median_ms,
                "speedup": speedup,
                "target_speedup": target,
                "meets_target": None if target is None else speedup >= target,
                "torch": timings["torch"].summary(),
                "cpp": timings["cpp"].summary(),
            }
        )
        print(
            f"plan {images}x{tokens}: torch {timings['torch'].median_ms:.1f} ms, cpp {timings['cpp'].median_ms:.1f} ms"
        )
    return rows


def knn_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """One item of ``--knn-tokens`` random tokens split into dropped (queries) and kept (refs) rows."""
    generator = torch.Generator().manual_seed(7)
    n = args.knn_tokens
    num_keep = keep_count(n, args.ratio)
    tokens = torch.randn(n, args.width, generator=generator).to(device, dtype)
    perm = torch.randperm(n, generator=generator).to(device)
    query, ref = tokens[perm[num_keep:]].contiguous(), tokens[perm[:num_keep]].contiguous()
    k = args.neighbors

    def cpp() -> torch.Tensor:
        return torch.ops.ipcv.knn(query, ref, k)

    def cdist_topk() -> torch.Tensor:
        return torch.cdist(query.float(), ref.float()).topk(k, dim=1, largest=False).indices

    return query, ref, {"cpp": cpp, "cdist_topk": cdist_topk}


def knn_peak_memory(variant: str, argv: list[str]) -> dict[str, Any]:
    """Peak extra memory of one knn variant, measured in a fresh process.

    A fresh process per variant keeps memory freed by an earlier call (and kept by the allocator)
    out of the reading; on the CPU, a fixed glibc mmap threshold makes every block of 64 KiB or more
    an mmap that is returned to the system when freed, so the resident-set high-water mark follows
    the live allocations.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--knn-memory", variant]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def knn_row(args: argparse.Namespace, argv: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    query, ref, fns = knn_inputs(args, device, dtype)
    k = args.neighbors
    # Correctness on a slice of the queries (the reference holds a [slice x keep] matrix only).
    rows = slice(0, 1024)
    expected = knn_reference(query[rows], ref, k)
    for name, fn in fns.items():
        assert_close(
            neighbour_distances(query[rows].cpu(), ref.cpu(), fn()[rows].cpu()),
            neighbour_distances(query[rows].cpu(), ref.cpu(), expected.cpu()),
            dtype=torch.float32,
        )
        print(f"knn check {name}: ok")

    memory = {name: knn_peak_memory(name, argv) for name in fns}
    timings = time_interleaved(fns, device, warmup=1, repeats=args.knn_repeats)
    extra_cpp, extra_cdist = memory["cpp"]["peak_extra_bytes"], memory["cdist_topk"]["peak_extra_bytes"]
    memory_ratio = extra_cpp / extra_cdist if extra_cpp is not None and extra_cdist else None
    time_ratio = timings["cpp"].median_ms / timings["cdist_topk"].median_ms
    print(
        f"knn n={args.knn_tokens}: cdist+topk {timings['cdist_topk'].median_ms:.0f} ms / {extra_cdist} B, "
        f"cpp {timings['cpp'].median_ms:.0f} ms / {extra_cpp} B"
    )
    return {
        "case": "knn",
        "shape": f"{query.shape[0]}x{ref.shape[0]}",
        "tokens": args.knn_tokens,
        "queries": query.shape[0],
        "refs": ref.shape[0],
        "width": args.width,
        "k": k,
        "dtype": str(dtype),
        "torch_median_ms": timings["cdist_topk"].median_ms,
        "cpp_median_ms": timings["cpp"].median_ms,
        "speedup": 1.0 / time_ratio,
        "cdist_topk_peak_extra_bytes": extra_cdist,
        "cpp_peak_extra_bytes": extra_cpp,
        "memory_method": memory["cpp"]["method"],
        "memory_ratio": memory_ratio,
        "target_memory_ratio": KNN_MEMORY_TARGET,
        "meets_target": None if memory_ratio is None else (memory_ratio <= KNN_MEMORY_TARGET and time_ratio <= 1.0),
        "torch": timings["cdist_topk"].summary(),
        "cpp": timings["cpp"].summary(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configure_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if cpp_backend.UNAVAILABLE_REASON is not None:
        print(f"bench_plan: {cpp_backend.UNAVAILABLE_REASON}", file=sys.stderr)
        return 1
    if args.knn_memory is not None:  # child process of knn_peak_memory
        _, peak = measure_peak_memory(knn_inputs(args, device, dtype)[2][args.knn_memory], device)
        print(json.dumps(peak.summary()))
        return 0
    load_before = load_average()
    rows = plan_rows(args, device, dtype)
    if args.knn_tokens > 0:
        rows.append(knn_row(args, argv, device, dtype))

    env = environment(device)
    # Other processes share this machine's cores: the load average says how quiet the run was.
    env["load_average_1_5_15min"] = {"before": load_before, "after": load_average()}
    files = ResultFiles(args.out, args.stem or f"plan_{device.type}")
    files.write_json({"benchmark": "bench_plan", "environment": env, "rows": rows})
    flat = [{k: v for k, v in row.items() if not isinstance(v, dict)} for row in rows]
    files.write_csv(flat)
    columns = [
        Column("case", "case"),
        Column("shape", "shape"),
        Column("dtype", "dtype"),
        Column("torch_median_ms", "reference / cdist+topk ms", ".1f"),
        Column("cpp_median_ms", "cpp ms", ".1f"),
        Column("speedup", "speed-up", ".2f"),
        Column("target_speedup", "target speed-up", ".1f"),
        Column("memory_ratio", "peak extra memory cpp / cdist", ".3f"),
        Column("meets_target", "meets target"),
    ]
    files.write_markdown(
        "# Compiled planning step and knn (`benchmarks/bench_plan.py`)\n\n"
        + environment_markdown(env)
        + f"\nLoad average (1, 5, 15 min) before / after: {env['load_average_1_5_15min']['before']} / "
        + f"{env['load_average_1_5_15min']['after']}.\n\n"
        + markdown_table(flat, columns)
    )
    print("\n".join(str(path) for path in files.written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
