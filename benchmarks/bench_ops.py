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

``--mode host-overhead`` measures host time instead, where compute is negligible (results:
``host_overhead_<device>.{json,md}``):

- the op layer per call: each public op on tiny inputs with ``skip_check=True`` vs the backend
  ``auto`` resolves to, called directly (the difference is what validation-free dispatch costs);
- a narrow deep Qwen2-VL tower (``--tower-depth`` blocks of width ``--tower-width``), IPCV-patched
  vs unpatched in interleaved rounds: each block's wall time from forward hooks, the patched minus
  the unpatched call of the same block per round, grouped by block kind (the planning block,
  stabilisation blocks, pruned blocks, the last block, which restores the output); and the device
  values read on the host per patched forward (each one a GPU synchronisation on CUDA).

``--baseline FILE`` adds an earlier run's JSON (e.g. of the commit before a change, with
``--label``) to the result files, before this run.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

import ipcv_kernels as ik
from ipcv_kernels._help_text import help_summary
from ipcv_kernels.bench.environment import configure_threads, environment, environment_markdown, load_average
from ipcv_kernels.bench.measure import (
    Spread,
    count_host_syncs,
    measure_peak_memory,
    noise_warnings,
    time_interleaved,
)
from ipcv_kernels.bench.results import Column, ResultFiles, Series, default_out, markdown_table, plot_series
from ipcv_kernels.ops.dispatch import resolve_backend
from ipcv_kernels.reference import keep_count
from ipcv_kernels.reference.knn import squared_distances
from ipcv_kernels.testing import assert_close_to_reference
from ipcv_kernels.testing.models import build_qwen2_vl_tower, qwen2_vl_vision_config, sample_pixels

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
    parser.add_argument(
        "--mode",
        choices=["ops", "host-overhead"],
        default="ops",
        help="ops: kernel timings per size; host-overhead: op-layer and engine host time (see the docstring)",
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
    host = parser.add_argument_group("--mode host-overhead")
    host.add_argument("--calls", type=int, default=200, help="op calls per timed sample")
    host.add_argument("--host-repeats", type=int, default=40, help="interleaved rounds")
    host.add_argument("--tower-depth", type=int, default=32)
    host.add_argument("--tower-width", type=int, default=32)
    host.add_argument("--as-layers", type=int, default=8, help="stabilisation blocks (prune layer 2)")
    host.add_argument("--label", default=None, help="this run's name in the result files")
    host.add_argument("--baseline", type=Path, default=None, help="an earlier host-overhead JSON to include")
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


# -- host overhead (--mode host-overhead) ----------------------------------------------------------
# aten ops that read a tensor's value on the host (each a device synchronisation on CUDA); on the CPU
# they are counted through a dispatch mode, and ``Tensor.tolist`` (invisible to it) by wrapping it.
HOST_READ_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "repeat_interleave", "is_nonzero"})


class HostReadCounter(TorchDispatchMode):
    """Counts the host reads of tensor values inside its ``with`` block (see ``HOST_READ_OPS``),
    including those inside the IPCV custom ops, which it enters instead of treating them as opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._tolist = torch.Tensor.tolist

    def __enter__(self) -> HostReadCounter:
        counter, tolist = self, self._tolist

        def counted_tolist(tensor: torch.Tensor) -> Any:
            counter.count += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ipcv_kernels":
            # Look inside the Python custom ops: run their implementation with this mode active.
            with self:
                return _maybe_get_opdef(func)._init_fn(*args, **kwargs)
        if func.name().split("::")[-1].split(".")[0] in HOST_READ_OPS:
            self.count += 1
        return func(*args, **kwargs)


def host_reads(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, str]:
    """Device-to-host reads of one call of ``fn`` and how they were counted."""
    if device.type == "cuda":
        return count_host_syncs(fn, device)[1], "torch.cuda.set_sync_debug_mode"
    counter = HostReadCounter()
    with counter:
        fn()
    return counter.count, "aten host-read ops + Tensor.tolist (CPU proxy)"


def repeated(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def tiny_op_cases(device: torch.device) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """op -> (the public op with ``skip_check=True``, the backend ``auto`` resolves to called directly),
    on inputs so small that the call's host work is all there is."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    def offsets(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    def resolved(op: str) -> Callable[..., Any]:
        return resolve_backend(op, "auto", device).fn

    q, k, v = randn(8, 2, 16), randn(16, 2, 16), randn(16, 2, 16)
    cu_q, cu_k = offsets(0, 4, 8), offsets(0, 8, 16)
    query, ref = randn(8, 16), randn(16, 16)
    x_before, x_after = randn(32, 16), randn(32, 16)
    cu_items = offsets(0, 16, 32)
    plan = ik.plan_ipcv(x_before, x_after, cu_items, cu_items, 0.5, 4)
    kept, base_kept, base_drop = randn(16, 16), x_after[plan.keep], x_after[plan.drop]
    out = torch.empty_like(x_after)
    restore_args = (out, kept, base_drop, base_kept, plan.keep, plan.drop, plan.neighbors)
    attention, knn, plan_fn, restore = (resolved(op) for op in ("ngr_attention", "knn", "plan", "ngr_restore"))
    return {
        "ngr_attention": (
            lambda: ik.ngr_attention(q, k, v, cu_q, cu_k, skip_check=True),
            lambda: attention(q, k, v, cu_q, cu_k, None),
        ),
        "knn": (lambda: ik.knn(query, ref, 4, cu_q, cu_k, skip_check=True), lambda: knn(query, ref, 4, cu_q, cu_k)),
        "plan": (
            lambda: ik.plan_ipcv(x_before, x_after, cu_items, cu_items, 0.5, 4, skip_check=True),
            lambda: plan_fn(x_before, x_after, cu_items, cu_items, 0.5, 4),
        ),
        "ngr_restore": (
            lambda: ik.ngr_restore(*restore_args, skip_check=True),
            lambda: restore(*restore_args, None, None, 0.0, None),
        ),
    }


def op_layer_overhead(device: torch.device, args) -> list[dict[str, Any]]:
    """Per op: µs per call of the public op and of its resolved backend (both under ``torch.no_grad()``),
    and their per-round difference."""
    rows = []
    for op, (public, direct) in tiny_op_cases(device).items():
        with torch.no_grad():  # as inference calls them
            timings = time_interleaved(
                {"public": repeated(public, args.calls), "direct": repeated(direct, args.calls)},
                device,
                warmup=args.warmup,
                repeats=args.host_repeats,
            )
        per_call = {name: [s * 1e3 / args.calls for s in t.samples_ms] for name, t in timings.items()}
        added = Spread.of([p - d for p, d in zip(per_call["public"], per_call["direct"], strict=True)])
        row = {
            "op": op,
            "public_us": statistics.median(per_call["public"]),
            "direct_us": statistics.median(per_call["direct"]),
            "added_us": added.median,
            "added_p10_us": added.p10,
            "added_p90_us": added.p90,
        }
        rows.append(row)
        print(
            f"op layer {op:14s} public {row['public_us']:8.1f} us  direct {row['direct_us']:8.1f} us  "
            f"added {added.median:6.1f} us",
            file=sys.stderr,
        )
    return rows


class BlockClock:
    """Wall time of every call of every block (forward pre-hook first, forward hook last), in µs."""

    def __init__(self, blocks: torch.nn.ModuleList) -> None:
        self.samples: list[list[float]] = [[] for _ in blocks]
        self._start = [0.0] * len(blocks)
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self._begin, index), prepend=True)
            block.register_forward_hook(functools.partial(self._end, index), always_call=True)

    def _begin(self, index: int, *_: object) -> None:
        self._start[index] = time.perf_counter()

    def _end(self, index: int, *_: object) -> None:
        self.samples[index].append((time.perf_counter() - self._start[index]) * 1e6)


def tower_overhead(device: torch.device, args) -> dict[str, Any]:
    """Host time of the patched narrow deep tower per block kind, over the unpatched tower's same block."""
    vision = qwen2_vl_vision_config(
        depth=args.tower_depth, embed_dim=args.tower_width, num_heads=2, mlp_ratio=1, hidden_size=args.tower_width
    )
    unpatched, patched = (build_qwen2_vl_tower(vision, device=device) for _ in range(2))
    config = ik.IPCVConfig(prune_layer=2, ratio=0.5, as_layers=args.as_layers, num_neighbors=4)
    ik.apply_ipcv(patched, config)
    pixels, grid_thw = sample_pixels(vision, [[1, 8, 8], [1, 8, 8]])
    pixels, grid_thw = pixels.to(device), grid_thw.to(device)
    clocks = {name: BlockClock(tower.blocks) for name, tower in (("unpatched", unpatched), ("patched", patched))}

    def forward(tower: torch.nn.Module) -> Callable[[], Any]:
        return lambda: tower(pixels, grid_thw=grid_thw)

    with torch.no_grad():
        reads, read_method = host_reads(forward(patched), device)
        baseline_reads, _ = host_reads(forward(unpatched), device)
        for clock in clocks.values():
            clock.samples = [[] for _ in clock.samples]
        timings = time_interleaved(
            {"unpatched": forward(unpatched), "patched": forward(patched)},
            device,
            warmup=0,
            repeats=args.host_repeats,
        )
    stabilisation_end = config.stabilisation_end(args.tower_depth)
    kinds = {
        "plan + stabilisation (block P)": [config.prune_layer],
        "stabilisation": list(range(config.prune_layer + 1, stabilisation_end)),
        "pruned": list(range(stabilisation_end, args.tower_depth - 1)),
        "last (restored output)": [args.tower_depth - 1],
    }
    rows = []
    for kind, indices in kinds.items():
        if not indices:  # a short tower may have no block of this kind
            continue
        # Per round and block: patched minus unpatched call of the same block (the same round ran both).
        added = [
            p - u
            for index in indices
            for p, u in zip(clocks["patched"].samples[index], clocks["unpatched"].samples[index], strict=True)
        ]
        spread = Spread.of(added)
        rows.append(
            {
                "block": kind,
                "blocks": len(indices),
                "unpatched_us": statistics.median(s for i in indices for s in clocks["unpatched"].samples[i]),
                "patched_us": statistics.median(s for i in indices for s in clocks["patched"].samples[i]),
                "added_us": spread.median,
                "added_p10_us": spread.p10,
                "added_p90_us": spread.p90,
            }
        )
        print(f"tower {kind:32s} added {spread.median:7.1f} us per block", file=sys.stderr)
    forward_added = Spread.of(
        [p - u for p, u in zip(timings["patched"].samples_ms, timings["unpatched"].samples_ms, strict=True)]
    )
    return {
        "tokens": int(grid_thw.prod(-1).sum()),
        "depth": args.tower_depth,
        "width": args.tower_width,
        "config": {"prune_layer": config.prune_layer, "ratio": config.ratio, "as_layers": config.as_layers},
        "unpatched_forward_ms": timings["unpatched"].median_ms,
        "patched_forward_ms": timings["patched"].median_ms,
        "forward_added_ms": forward_added.median,
        "host_reads_per_patched_forward": reads,
        "host_reads_per_unpatched_forward": baseline_reads,
        "host_read_method": read_method,
        "blocks": rows,
    }


def host_overhead_main(args, device: torch.device) -> int:
    env = environment(device)
    load_before = load_average()
    ops = op_layer_overhead(device, args)
    tower = tower_overhead(device, args)
    load_after = load_average()
    label = args.label or "this checkout"
    files = ResultFiles(args.out, f"host_overhead_{device.type}")
    payload = {
        "environment": env,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "label": label,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "noise": noise_warnings({}, load_after),
        "op_layer": ops,
        "tower": tower,
    }
    runs = [payload]
    if args.baseline is not None:
        runs.insert(0, json.loads(args.baseline.read_text()))
        payload = {**payload, "baseline": runs[0]}
    files.write_json(payload)
    files.write_markdown(host_overhead_markdown(env, runs))
    for path in files.written:
        print(path)
    return 0


def host_overhead_markdown(env: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """One section per run (e.g. the checkout before a change, then after it)."""
    op_columns = [
        Column("op", "op"),
        Column("public_us", "public op µs", ".1f"),
        Column("direct_us", "resolved backend µs", ".1f"),
        Column("added_us", "added µs (median)", ".1f"),
        Column("added_p10_us", "p10", ".1f"),
        Column("added_p90_us", "p90", ".1f"),
    ]
    block_columns = [
        Column("block", "block"),
        Column("blocks", "count"),
        Column("unpatched_us", "unpatched µs", ".1f"),
        Column("patched_us", "patched µs", ".1f"),
        Column("added_us", "added µs (median)", ".1f"),
        Column("added_p10_us", "p10", ".1f"),
        Column("added_p90_us", "p90", ".1f"),
    ]
    sections = [environment_markdown(env)]
    for run in runs:
        tower, settings = run["tower"], run["settings"]
        load = ", ".join(
            "n/a" if value is None else " / ".join(f"{x:.2f}" for x in value)
            for value in (run["load_average_before"], run["load_average_after"])
        )
        sections.append(
            f"## {run['label']}\n\n"
            f"Load average (1/5/15 min) before, after: {load}. Medians of {settings['host_repeats']} "
            f"interleaved rounds.{''.join(f' Noisy: {warning}.' for warning in run.get('noise', []))}\n\n"
            f"### Op layer per call (tiny inputs, `skip_check=True`, under `torch.no_grad()`, "
            f"{settings['calls']} calls per sample)\n\n"
            + markdown_table(run["op_layer"], op_columns)
            + f"\n\n### Tower host time per block over the unpatched block\n\n"
            f"Qwen2-VL tower, depth {tower['depth']}, width {tower['width']}, {tower['tokens']} tokens "
            f"(two images), IPCV {tower['config']}. Whole forward: unpatched "
            f"{tower['unpatched_forward_ms']:.2f} ms, patched {tower['patched_forward_ms']:.2f} ms. Host reads "
            f"of device values per forward: patched {tower['host_reads_per_patched_forward']}, unpatched "
            f"{tower['host_reads_per_unpatched_forward']} ({tower['host_read_method']}).\n\n"
            + markdown_table(tower["blocks"], block_columns)
        )
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.mode == "host-overhead":
        return host_overhead_main(args, device)
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
