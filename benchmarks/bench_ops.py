"""Op-level benchmark of the IPCV kernels: ``python benchmarks/bench_ops.py --out DIR``.

Per image size ``n`` (tokens of one image, ratio 0.65, width 1280 = 16 heads x 80, 10 neighbours,
the Qwen2-VL-7B setting) it times, after checking every variant's output:

- ``knn``: the IPCV neighbour search (dropped -> kept tokens) through each ``knn`` backend, vs
  ``torch.cdist`` + ``topk`` (which materialises the whole drop x keep matrix);
- attention of one attention-stabilisation block: kept queries over all keys (``ngr_attention``
  with each backend) vs the paper code's path (attention for every query, then the dropped rows
  are discarded), each with and without the vision rotary (a Triton pass over kept q and k for
  the Triton backend, PyTorch ops before the others);
- the AS block's input: kept rows and NGR reconstructions scattered into the full sequence, then
  its LayerNorm (``ngr_reconstruct`` per backend + PyTorch), vs ``ngr_restore`` per backend (one
  fused pass on Triton).

Backends are those available on the device (on the CPU: ``torch`` and ``sdpa``; the Triton
interpreter is excluded as meaningless for timing). Results: ``bench_ops.json`` (device, versions,
every sample), ``.csv``, ``.md`` and one plot per op, in ``--out`` (default ``./ipcv_results/ops``;
the committed results are regenerated with ``--out benchmarks/results``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ipcv_kernels as ik
from ipcv_kernels._help_text import help_summary
from ipcv_kernels.bench.environment import configure_threads, environment, environment_markdown
from ipcv_kernels.bench.measure import measure_peak_memory, time_interleaved
from ipcv_kernels.bench.results import Column, ResultFiles, Series, default_out, markdown_table, plot_series
from ipcv_kernels.reference import keep_count
from ipcv_kernels.reference.knn import squared_distances
from ipcv_kernels.testing import assert_close_to_reference

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Backends never timed here: the reference is timed through "torch" only where it fits in memory.
ATTENTION_BACKENDS = ("triton", "flash_attn", "torch_varlen", "sdpa", "torch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=help_summary(__doc__))
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out("ops"),
        help="result folder, relative to the current directory (--out benchmarks/results rewrites the committed "
        "results; default: %(default)s)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="tokens per image")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--neighbors", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--on-check-failure",
        choices=["stop", "warn"],
        default="stop",
        help="warn: time a variant whose output check failed anyway (listed under 'Checks' in the .md)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="record a case that raises (out of memory, a kernel error) as an error row and go on",
    )
    parser.add_argument(
        "--triton-interpreter",
        action="store_true",
        help="include the Triton backends on the CPU (TRITON_INTERPRET=1: a smoke test, not a timing)",
    )
    parser.add_argument(
        "--reference-max-tokens",
        type=int,
        default=4096,
        help="largest n for the 'torch' reference backends (they hold one segment's score matrix)",
    )
    return parser.parse_args(argv)


def usable_backends(op: str, device: torch.device, dtype: torch.dtype, n: int, args) -> list[str]:
    names = ik.available_backends(op, device)
    if device.type == "cpu" and not args.triton_interpreter:
        names = [b for b in names if b != "triton"]  # only the interpreter would run it here
    if dtype == torch.float32:
        names = [b for b in names if b not in ("flash_attn", "torch_varlen")]  # fp16/bf16 only
    if n > args.reference_max_tokens:
        names = [b for b in names if b != "torch"]
    return names


def knn_case(n: int, dtype: torch.dtype, device: torch.device, args) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(n, args.width, generator=generator).to(device=device, dtype=dtype)
    num_keep = keep_count(n, args.ratio)
    kept, dropped = base[:num_keep], base[num_keep:]
    k = args.neighbors

    def cdist_topk() -> torch.Tensor:
        dist = torch.cdist(dropped.float(), kept.float())
        return dist.topk(min(k, num_keep), dim=1, largest=False).indices

    variants: dict[str, Callable[[], torch.Tensor]] = {"cdist_topk": cdist_topk}
    for backend in usable_backends("knn", device, dtype, n, args):
        variants[f"knn_{backend}"] = lambda backend=backend: ik.knn(dropped, kept, k, backend=backend)

    # Correctness first: every variant's neighbours at the exact distances of cdist + topk's.
    exact = squared_distances(dropped.double(), kept.double())
    expected = exact.gather(1, cdist_topk()).sort(1).values
    for name, fn in variants.items():
        check(name, n, lambda fn=fn: assert_close_to_reference(exact.gather(1, fn()).sort(1).values, expected), args)
    return measure("knn", variants, n, dtype, device, args)


def attention_case(n: int, dtype: torch.dtype, device: torch.device, args) -> list[dict[str, Any]]:
    heads, head_dim = args.heads, args.width // args.heads
    generator = torch.Generator().manual_seed(n + 1)
    q, k, v = (torch.randn(n, heads, head_dim, generator=generator).to(device=device, dtype=dtype) for _ in range(3))
    angles = torch.rand(n, head_dim // 2, generator=generator).to(device) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keep = torch.randperm(n, generator=generator)[: keep_count(n, args.ratio)].sort().values.to(device)
    cu_full = torch.tensor([0, n], dtype=torch.int32, device=device)
    cu_keep = torch.tensor([0, keep.numel()], dtype=torch.int32, device=device)

    variants: dict[str, Callable[[], torch.Tensor]] = {}
    for backend in usable_backends("ngr_attention", device, dtype, n, args):
        variants[f"kept_{backend}"] = lambda b=backend: ik.ngr_attention(q[keep], k, v, cu_keep, cu_full, backend=b)
        variants[f"full_then_discard_{backend}"] = lambda b=backend: ik.ngr_attention(
            q, k, v, cu_full, cu_full, backend=b
        )[keep]
        variants[f"kept_rotary_{backend}"] = lambda b=backend: ik.ngr_attention(
            q, k, v, cu_keep, cu_full, rotary=(cos, sin), q_rows=keep, backend=b
        )
        variants[f"full_rotary_then_discard_{backend}"] = lambda b=backend: ik.ngr_attention(
            q, k, v, cu_full, cu_full, rotary=(cos, sin), backend=b
        )[keep]

    # Correctness first, against sdpa on fp32 copies (memory-efficient at every size).
    oracle = {
        rotary: ik.ngr_attention(
            q.float(),
            k.float(),
            v.float(),
            cu_keep,
            cu_full,
            rotary=(cos, sin) if rotary else None,
            q_rows=keep,
            backend="sdpa",
        )
        for rotary in (False, True)
    }
    for name, fn in variants.items():
        check(name, n, lambda fn=fn, name=name: assert_close_to_reference(fn(), oracle["rotary" in name]), args)
    return measure("attention", variants, n, dtype, device, args)


def restore_case(n: int, dtype: torch.dtype, device: torch.device, args) -> list[dict[str, Any]]:
    """The full sequence an AS block reads: kept rows + NGR rows, then its LayerNorm ``norm1``."""
    generator = torch.Generator().manual_seed(n + 2)
    base = torch.randn(n, args.width, generator=generator).to(device=device, dtype=dtype)
    keep = torch.randperm(n, generator=generator)[: keep_count(n, args.ratio)].sort().values.to(device)
    is_drop = torch.ones(n, dtype=torch.bool, device=device)
    is_drop[keep] = False
    drop = is_drop.nonzero().squeeze(1)
    kept = base[keep] + 0.1 * torch.randn(keep.numel(), args.width, generator=generator).to(device=device, dtype=dtype)
    base_kept, base_drop = base[keep], base[drop]
    neighbors = ik.knn(base_drop, base_kept, args.neighbors)
    norm = torch.nn.LayerNorm(args.width, eps=1e-6).to(device=device, dtype=dtype)

    def unfused(backend: str) -> torch.Tensor:
        full = torch.empty_like(base)
        full[keep] = kept
        full[drop] = ik.ngr_reconstruct(base_drop, kept, base_kept, neighbors, backend=backend)
        return norm(full)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        f"scatter_then_norm_{backend}": lambda b=backend: unfused(b)
        for backend in usable_backends("ngr_reconstruct", device, dtype, n, args)
    }
    for backend in usable_backends("ngr_restore", device, dtype, n, args):

        def restore(b: str = backend) -> torch.Tensor:
            full, normed = torch.empty_like(base), torch.empty_like(base)
            ik.ngr_restore(
                full, kept, base_drop, base_kept, keep, drop, neighbors, norm=norm, normed_out=normed, backend=b
            )
            return normed

        variants[f"ngr_restore_{backend}"] = restore

    with torch.no_grad():
        expected = unfused("torch").double()
        for name, fn in variants.items():
            check(name, n, lambda fn=fn: assert_close_to_reference(fn(), expected), args)
        return measure("restore", variants, n, dtype, device, args)


def check(name: str, n: int, assertion: Callable[[], None], args) -> None:
    """Run one output check; with ``--on-check-failure warn`` a failure is recorded, not raised."""
    try:
        assertion()
    except AssertionError as error:
        if args.on_check_failure == "stop":
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "AssertionError"
        args.check_failures.append(f"{name} (n={n}): {first_line}")
        print(f"WARNING: check failed: {name} (n={n}); timing it anyway (--on-check-failure warn)", file=sys.stderr)
        return
    print(f"  check ok: {name}", file=sys.stderr)


def measure(group: str, variants: dict[str, Callable[[], Any]], n: int, dtype, device, args) -> list[dict[str, Any]]:
    timings = time_interleaved(variants, device, warmup=args.warmup, repeats=args.repeats)
    rows = []
    for name, fn in variants.items():
        _, memory = measure_peak_memory(fn, device)
        summary = timings[name].summary()
        rows.append(
            {
                "group": group,
                "variant": name,
                "tokens": n,
                "dtype": str(dtype).removeprefix("torch."),
                "median_ms": summary["median_ms"],
                "p10_ms": summary["p10_ms"],
                "p90_ms": summary["p90_ms"],
                "peak_extra_mib": None if memory.peak_extra_bytes is None else memory.peak_extra_bytes / 2**20,
                "memory_method": memory.method,
                "samples_ms": summary["samples_ms"],
            }
        )
        print(f"{group:9s} n={n:6d} {name:36s} {summary['median_ms']:10.3f} ms", file=sys.stderr)
    return rows


def plot(files: ResultFiles, rows: list[dict[str, Any]], group: str, title: str) -> None:
    names = list(dict.fromkeys(r["variant"] for r in rows if r["group"] == group))
    if not names:  # every size of this op failed (--keep-going)
        return
    series = []
    for name in names:
        picked = sorted((r["tokens"], r["median_ms"]) for r in rows if r["group"] == group and r["variant"] == name)
        style = "--" if "discard" in name or name == "cdist_topk" else "o-"
        series.append(Series(name, [p[0] for p in picked], [p[1] for p in picked], style))
    path = plot_series(files.path(f"_{group}.png"), series, xlabel="tokens per image", ylabel="median ms", title=title)
    files.written.append(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    env = environment(device)
    args.check_failures = []
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for n in args.sizes:
        for group, case in (("knn", knn_case), ("attention", attention_case), ("restore", restore_case)):
            try:
                rows += case(n, dtype, device, args)
            except Exception as error:
                if not args.keep_going:
                    raise
                errors.append({"group": group, "tokens": n, "error": f"{type(error).__name__}: {error}"})
                print(f"ERROR: {group} n={n}: {type(error).__name__}: {error} (--keep-going)", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    files = ResultFiles(args.out, "bench_ops")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "check_failures"}
    files.write_json(
        {
            "environment": env,
            "settings": settings,
            "check_failures": args.check_failures,
            "errors": errors,
            "results": rows,
        }
    )
    files.write_csv([{k: v for k, v in r.items() if k != "samples_ms"} for r in rows])
    columns = [
        Column("group", "op"),
        Column("variant", "variant"),
        Column("tokens", "n"),
        Column("dtype", "dtype"),
        Column("median_ms", "median ms", ".3f"),
        Column("p10_ms", "p10", ".3f"),
        Column("p90_ms", "p90", ".3f"),
        Column("peak_extra_mib", "peak extra MiB", ".1f"),
    ]
    checks = "\n".join(f"- FAILED: {failure}" for failure in args.check_failures) or "every output check passed"
    failed_cases = "".join(f"\n- ERROR: {e['group']} n={e['tokens']}: {e['error']}" for e in errors)
    files.write_markdown(
        environment_markdown(env)
        + "\n\n"
        + markdown_table(rows, columns)
        + f"\n\n## Checks\n\n{checks}{failed_cases}\n"
    )
    shape = f"ratio {args.ratio}, D={args.width}, {args.heads} heads, {dtype}, {env['device_name']}"
    plot(files, rows, "knn", f"knn (dropped -> kept, k={args.neighbors})\n{shape}")
    plot(files, rows, "attention", f"AS-block attention: kept queries vs full-then-discard\n{shape}")
    plot(files, rows, "restore", f"AS-block input: kept + NGR rows into the full sequence, then norm1\n{shape}")
    for path in files.written:
        print(path)
    return 1 if errors or args.check_failures else 0


if __name__ == "__main__":
    sys.exit(main())
