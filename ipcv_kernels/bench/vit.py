"""End-to-end benchmark of a vision tower of any family of the table (``ipcv_kernels.families``):
unpatched vs the paper's formulation vs IPCV.

Entry points: ``python -m ipcv_kernels bench ...`` (``add_arguments`` and ``run`` are its
subcommand) and ``python benchmarks/bench_vit.py ...``, which runs that subcommand. The variants
(``ipcv_kernels.bench.variants``: (a) unpatched, (b) the paper's formulation, (c) IPCV, and
optionally (c) with another attention backend) run on the same tower, interleaved round by round.

Before timing, every case is checked: (b) and (c) must agree, and (c) at ``ratio=0`` must equal
(a) (``--check first`` does the ratio-0 forward for the first case only). The bound is the FLOP
model's speedup (``ipcv_kernels.flops``); ``efficiency`` = measured speedup / bound. Every speedup
comes with the p10-p90 of its per-round values and a verdict on noise (``measure.noise_warnings``).

Weights are seeded random (speed does not depend on their values) unless ``--model PATH`` loads a
real checkpoint's vision tower from a local directory (``ipcv_kernels.bench.towers``). How a
tower is called, how cases become its inputs and which FLOP model bounds it is its family's
convention (``ipcv_kernels.bench.calls``); a preset with a ``ModelUse`` or a full checkpoint is called
as its full model calls the tower (LLaVA's ``vision_feature_layer``, whose later blocks neither
(a) nor (c) runs, and anyres crops; ``ipcv_kernels.families.ModelUse``). ``--recommended`` takes the family's recommended IPCV
setting (``ipcv_kernels.families``) instead of the suite's. Results go
to ``--out`` (default ``./ipcv_results/vit``); the report is ``ipcv_kernels.bench.report``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..families import presets
from ..flops import FlopReport, predicted_speedup
from ..ops import available_backends
from ..testing import tolerance
from . import environment, measure, progress, results
from .calls import Case, GridCalls, TowerCalls, load_calls, parse_grid_case
from .presets import SUITES
from .report import markdown_report, plot, table_rows
from .variants import VARIANTS, attention_variant_backend, attention_variants, variant_configs

PLANNED_OPS = ("plan", "knn", "ngr_reconstruct", "ngr_attention")


# -- cases ----------------------------------------------------------------------------------------
def parse_case(text: str, vision_config: Any) -> Case:
    """A case of a Qwen tower (``calls.parse_grid_case``); ``TowerCalls.parse_case`` for any tower."""
    return parse_grid_case(text, vision_config)


# -- checks ---------------------------------------------------------------------------------------
def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius, fp64)."""
    expected64 = expected.double()
    return float((actual.double() - expected64).norm() / expected64.norm().clamp_min(1e-300))


def agreement_bound(dtype: torch.dtype, depth: int) -> float:
    """Relative error two correct implementations of the whole tower may show in ``dtype``.

    The per-op relative tolerance of the shared table (``ipcv_kernels.testing``), grown by
    ``sqrt(depth)``: every block adds an independent rounding error of that size to the residual
    stream. A wrong row, segment or neighbour gives errors of order 1, far above it.
    """
    return tolerance(dtype).rtol * math.sqrt(depth)


# -- the run --------------------------------------------------------------------------------------
@dataclass
class Bench:
    """A tower under test, its call convention and how to run one variant of it."""

    tower: nn.Module
    calls: TowerCalls
    device: torch.device
    dtype: torch.dtype
    configs: dict[str, IPCVConfig | None]

    @property
    def vision_config(self) -> Any:
        return self.calls.config

    def select(self, variant: str) -> None:
        """Patch the tower as ``variant`` runs it (or unpatch it, for ``unpatched``)."""
        self.calls.switch(self.configs[variant])

    def inputs(self, case: Case, seed: int) -> tuple[Case, tuple]:
        """Seeded random inputs of ``case`` (``TowerCalls.inputs``), on the bench's device and dtype."""
        return self.calls.inputs(case, seed, self.device, self.dtype)

    def forward(self, inputs: tuple[Case, tuple]) -> torch.Tensor:
        """One inference call of the tower as selected; the output compared (``TowerCalls.forward``)."""
        return self.calls.forward(inputs)


def run_case(
    bench: Bench,
    case: Case,
    variants: Sequence[str],
    *,
    warmup: int,
    repeats: int,
    check_ratio_zero: bool,
    stop_on_check_failure: bool = True,
    seed: int,
    bar: progress.Progress,
    breakdown: bool = False,
) -> dict[str, Any]:
    """Check, measure memory and time the variants on one case; everything JSON-ready.

    ``breakdown``: one more untimed call per variant, timed stage by stage (``block_breakdown``).
    """
    inputs = bench.inputs(case, seed)
    depth = bench.calls.depth
    result: dict[str, Any] = {"case": case.name, "kind": case.kind}
    if case.grid_thw:
        result["grid_thw"] = [list(g) for g in case.grid_thw]
    else:
        result["tiles_per_image"], result["tile_tokens"] = list(case.tiles_per_image), case.tile_tokens
        if any(case.tile_padding):
            result["padding_patches"] = list(case.tile_padding)
    result["tokens"] = case.tokens

    # Warm-up calls: the first one's output feeds the checks, the last one's peak memory is kept
    # (so one-time allocations such as library workspaces or autotuning do not count).
    outputs: dict[str, torch.Tensor] = {}
    memory: dict[str, measure.PeakMemory] = {}
    kept_per_block: list[int] | None = None
    for variant in variants:
        for call in range(max(1, warmup)):
            bench.select(variant)
            output, peak = measure.measure_peak_memory(lambda: bench.forward(inputs), bench.device)
            if call == 0:
                outputs[variant] = output
            memory[variant] = peak
            del output
        if variant == "ipcv":
            kept_per_block = bench.calls.tokens_per_block()

    checks: dict[str, Any] = {"bound": agreement_bound(bench.dtype, depth)}
    if "paper" in outputs and "ipcv" in outputs:
        checks["ipcv_vs_paper"] = relative_error(outputs["ipcv"], outputs["paper"])
        if not checks["ipcv_vs_paper"] <= checks["bound"]:
            # (b) and (c) plan with different backends, which may break a near-tie of scores at the
            # keep / drop cut (or of distances) differently: the spec allows either, and one swapped
            # token moves the output by ~1/sqrt(tokens). Then (c) must match the paper's formulation
            # planned by (c)'s own backends, and (b) vs (c) is kept as information only.
            checks["ipcv_vs_paper_informative"] = checks.pop("ipcv_vs_paper")
            bench.calls.switch(replace(bench.configs["ipcv"], as_queries="all"))
            same_plan = bench.forward(inputs)
            checks["ipcv_vs_paper_same_planning"] = relative_error(outputs["ipcv"], same_plan)
    for variant in attention_variants(list(outputs)) if "ipcv" in outputs else ():
        # Same planning as (c), another attention kernel: agreement to round-off.
        checks[f"{variant}_vs_ipcv"] = relative_error(outputs[variant], outputs["ipcv"])
    if check_ratio_zero and "unpatched" in outputs:
        bench.calls.switch(replace(bench.configs["ipcv"], ratio=0.0))
        checks["ratio0_vs_unpatched"] = relative_error(bench.forward(inputs), outputs["unpatched"])
    failed = {
        k: v
        for k, v in checks.items()
        if k.endswith(("_paper", "_planning", "_unpatched", "_vs_ipcv")) and not v <= checks["bound"]
    }
    checks["passed"] = not failed
    result["checks"] = checks
    if failed:
        message = f"case {case.name}: outputs disagree beyond {checks['bound']:.2e}: {failed}"
        if stop_on_check_failure:
            raise RuntimeError(message)
        print(f"WARNING: {message}; timing it anyway (--on-check-failure warn)", file=sys.stderr)
    del outputs

    timings = measure.time_interleaved(
        {v: (lambda: bench.forward(inputs)) for v in variants},
        bench.device,
        warmup=0,
        repeats=repeats,
        before_each=bench.select,
        progress=bar.update,
    )
    flops = {v: bench.calls.flops(case, bench.configs[v]) for v in variants}
    result["kept_tokens"] = flops["ipcv"].kept_tokens if "ipcv" in flops else None
    result["ipcv_tokens_per_block"] = kept_per_block
    result["variants"] = {
        v: {
            **timings[v].summary(),
            "memory": memory[v].summary(),
            "gflops": flops[v].total / 1e9,
            "tflops_per_s": flops[v].total / (timings[v].median_ms * 1e-3) / 1e12,
        }
        for v in variants
    }
    speedup_spreads: dict[str, measure.Spread] = {}
    if "unpatched" in variants:
        base = timings["unpatched"].median_ms
        for v in variants:
            if v == "unpatched":
                continue
            result[f"speedup_{v}"] = base / timings[v].median_ms
            # From the fastest call of each: on a shared host, the least disturbed estimate.
            result[f"speedup_{v}_min"] = timings["unpatched"].min_ms / timings[v].min_ms
            result[f"bound_{v}"] = predicted_speedup(flops["unpatched"], flops[v])
            result[f"efficiency_{v}"] = result[f"speedup_{v}"] / result[f"bound_{v}"]
            rounds = measure.Spread.of(measure.round_speedups(timings["unpatched"], timings[v]))
            result[f"speedup_{v}_p10"], result[f"speedup_{v}_p90"] = rounds.p10, rounds.p90
            speedup_spreads[v] = rounds
    # Taken right after this case's rounds: how busy the host was while they ran.
    result["load_average"] = environment.load_average()
    result["noise_warnings"] = measure.noise_warnings(speedup_spreads, result["load_average"])
    if "paper" in variants and "ipcv" in variants:
        result["ipcv_over_paper"] = timings["paper"].median_ms / timings["ipcv"].median_ms
    if breakdown:
        for v in variants:
            bench.select(v)
            result["variants"][v]["breakdown"] = block_breakdown(bench, inputs, flops[v], bench.configs[v])
            # Host-device syncs of one forward (CUDA only): each one idles the GPU while the host
            # launches the next kernels, which matters most for small inputs.
            _, result["variants"][v]["host_syncs"] = measure.count_host_syncs(
                lambda: bench.forward(inputs), bench.device
            )
    return result


def block_breakdown(
    bench: Bench, inputs: tuple[Case, tuple], report: FlopReport, config: IPCVConfig | None
) -> dict[str, Any]:
    """Milliseconds, FLOP-model GFLOP and achieved TFLOP/s per stage of one call of the selected
    variant: patch embedding, blocks grouped by kind (``full``, ``stabilised`` / ``stabilised_all``,
    ``pruned``; the planning runs inside block ``P`` and the restoration inside the last block, so
    those get their own stage), merger. Shows where a gap to the FLOP bound sits. Qwen towers only."""
    tower = bench.tower
    modules = {"embed": tower.patch_embed, **{f"block{i}": b for i, b in enumerate(tower.blocks)}}
    modules["merger"] = tower.merger
    _, ms = measure.time_modules(lambda: bench.forward(inputs), modules, bench.device)
    stages: dict[str, dict[str, float]] = {}

    def add(stage: str, millis: float, flops: float) -> None:
        entry = stages.setdefault(stage, {"ms": 0.0, "gflop": 0.0})
        entry["ms"] += millis
        entry["gflop"] += flops / 1e9

    add("embed", ms["embed"], report.embed)
    last = len(report.blocks) - 1
    for block in report.blocks:
        stage, flops = block.kind, block.total
        if config is not None and block.index == config.prune_layer:
            stage, flops = f"{stage} + planning", flops + report.planning
        if config is not None and block.index == last:
            stage, flops = f"{stage} + restoration", flops + report.restoration
        add(stage, ms[f"block{block.index}"], flops)
    add("merger", ms["merger"], report.merger)
    for entry in stages.values():
        entry["tflops_per_s"] = entry["gflop"] / entry["ms"] if entry["ms"] > 0 else None  # GFLOP/ms
    return {"stages": stages, "block_ms": [ms[f"block{i}"] for i in range(len(report.blocks))]}


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags. Unset IPCV and timing flags take the ``--suite``'s values."""
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default=None,
        help="defaults for the model, dtype, cases, IPCV setting, warm-up and repeats "
        "(ipcv_kernels.bench.presets; default: gpu with --device cuda*, else cpu)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(presets()), help="seeded random tower of this shape (default: the suite's)"
    )
    source.add_argument(
        "--model",
        type=Path,
        help="local checkpoint directory of any supported family (a full model or a bare tower): load its vision tower",
    )
    parser.add_argument("--dtype", choices=sorted(environment.DTYPES), help="weights and inputs (default: the suite's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--cases",
        nargs="+",
        help="inputs in pixels: HxW (an image), HxW*B (a batch of B images), HxW@F (a video of F frames, Qwen "
        "towers only); towers of a fixed image size S (CLIP, SigLIP, InternViT) split an image into tiles of S "
        "(default: the suite's for Qwen towers, one image of S otherwise)",
    )
    parser.add_argument(
        "--recommended",
        action="store_true",
        help="start from the tower's family's recommended IPCV setting (ipcv_kernels.families; "
        "IPCVConfig's defaults where the table gives none) instead of the suite's",
    )
    parser.add_argument("--ratio", type=float, help="IPCV ratio: fraction of tokens dropped (default: the suite's)")
    parser.add_argument("--prune-layer", type=int, help="IPCV prune layer P (default: the suite's)")
    parser.add_argument("--as-layers", type=int, help="IPCV attention-stabilisation blocks (default: the suite's)")
    parser.add_argument("--neighbors", type=int, help="IPCV kept neighbours per dropped token (default: the suite's)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help=f"of {', '.join(VARIANTS)}, and ipcv_<ngr_attention backend> (e.g. ipcv_torch_varlen)",
    )
    parser.add_argument("--warmup", type=int, help="untimed calls per variant and case (default: the suite's)")
    parser.add_argument("--repeats", type=int, help="timed interleaved rounds per case (default: the suite's)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument(
        "--check",
        choices=("first", "all", "none"),
        default="first",
        help="cases that get the ratio-0 equivalence check (first: the first case only)",
    )
    parser.add_argument(
        "--on-check-failure",
        choices=("stop", "warn"),
        default="stop",
        help="warn: record the failed check and time the case anyway",
    )
    parser.add_argument("--attn-implementation", default="sdpa", help="the tower's attention (sdpa, eager, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument(
        "--out",
        type=Path,
        default=results.default_out("vit"),
        help="directory of the result files, relative to the current directory "
        "(--out benchmarks/results rewrites the committed results)",
    )
    parser.add_argument(
        "--name", default=None, help="file stem (default: vit_<suite>, or vit_<model>_<device> without --suite)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time every stage and count host syncs (extra calls per variant)"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="show no progress bar")


def settings_from_args(args: argparse.Namespace, base_ipcv: IPCVConfig | None = None) -> dict[str, Any]:
    """Merge ``--suite`` defaults (or ``base_ipcv``'s IPCV fields, where given) with explicit flags
    (flags win)."""
    suite = SUITES[args.suite or ("gpu" if (args.device or "").startswith("cuda") else "cpu")]
    base = base_ipcv or suite.ipcv
    ipcv = IPCVConfig(
        prune_layer=args.prune_layer if args.prune_layer is not None else base.prune_layer,
        ratio=args.ratio if args.ratio is not None else base.ratio,
        as_layers=args.as_layers if args.as_layers is not None else base.as_layers,
        num_neighbors=args.neighbors if args.neighbors is not None else base.num_neighbors,
    )
    return {
        "suite": args.suite,
        "model": str(args.model) if args.model is not None else (args.preset or suite.model),
        "from_checkpoint": args.model is not None,
        "dtype": args.dtype or suite.dtype,
        "cases": list(args.cases or suite.cases),
        "ipcv": ipcv,
        "warmup": args.warmup if args.warmup is not None else suite.warmup,
        "repeats": args.repeats if args.repeats is not None else suite.repeats,
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; write the result files and return the payload.

    ``args.command_line`` (set by ``ipcv_kernels.__main__``) is recorded as the reproduce command.
    """
    environment.configure_threads(args.threads)
    load_at_start = environment.load_average()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = settings_from_args(args)
    dtype = environment.DTYPES[s["dtype"]]
    attn = args.attn_implementation
    model, preset = (args.model, None) if s["from_checkpoint"] else (None, s["model"])
    calls = load_calls(model, preset, dtype=dtype, device=device, seed=args.seed, attn_implementation=attn)
    tower, use, vision_config = calls.tower, calls.use, calls.config
    if getattr(args, "recommended", False):
        s["ipcv"] = settings_from_args(args, IPCVConfig(**calls.model_family.recommended))["ipcv"]
    s["family"] = calls.model_family.name
    s["model_use"] = None if use is None else asdict(use)
    s["reads"] = calls.reading()
    if s["reads"] is not None:
        print(s["reads"], file=sys.stderr)
    if not args.cases and calls.default_cases() is not None:
        s["cases"] = list(calls.default_cases())
    if args.breakdown and not isinstance(calls, GridCalls):
        raise ValueError(f"--breakdown times the stages of Qwen towers only, not of a {calls.family.name} tower")
    ipcv: IPCVConfig = s["ipcv"]
    ipcv.check_depth(calls.depth)
    cases = [calls.parse_case(text) for text in s["cases"]]
    variants = [v for v in VARIANTS if v in args.variants]
    variants += [v for v in dict.fromkeys(args.variants) if v not in VARIANTS]
    configs = variant_configs(ipcv, variants)
    for variant in attention_variants(variants):
        backend = attention_variant_backend(variant)
        if backend not in available_backends("ngr_attention", device):
            raise ValueError(f"variant {variant}: ngr_attention backend {backend!r} is not available on {device}")
    bench = Bench(tower, calls, device, dtype, configs)

    stem = args.name or (f"vit_{args.suite}" if args.suite else f"vit_{Path(s['model']).name}_{device.type}")
    files = results.ResultFiles(args.out, stem)
    case_results = []
    total = len(cases) * len(variants) * s["repeats"]
    with progress.Progress(total, "bench_vit", enabled=not args.no_progress) as bar:
        for index, case in enumerate(cases):
            bar.describe(f"{case.name} ({case.tokens} tokens)")
            check_ratio_zero = args.check == "all" or (args.check == "first" and index == 0)
            case_results.append(
                run_case(
                    bench,
                    case,
                    variants,
                    warmup=s["warmup"],
                    repeats=s["repeats"],
                    check_ratio_zero=check_ratio_zero,
                    seed=args.seed + index,
                    bar=bar,
                    breakdown=args.breakdown,
                    stop_on_check_failure=args.on_check_failure == "stop",
                )
            )
    calls.switch(None)

    env = {**environment.environment(device), "load_average_start": load_at_start}
    payload = {
        "benchmark": "vit",
        "environment": env,
        "settings": {
            **s,
            "ipcv": asdict(ipcv),
            "variants": variants,
            "variant_configs": {v: None if c is None else asdict(c) for v, c in bench.configs.items()},
            "ipcv_backends": {op: (available_backends(op, device) or ["none"])[0] for op in PLANNED_OPS},
            "vision_config": vision_config.to_dict(),
            "attn_implementation": args.attn_implementation,
            "memory_method": case_results[0]["variants"][variants[0]]["memory"]["method"] if case_results else None,
            "check": args.check,
            "seed": args.seed,
            "command": args.command_line,
        },
        "cases": case_results,
    }
    rows = table_rows(case_results, variants)
    files.write_json(payload)
    files.write_csv(rows)
    files.write_markdown(markdown_report(payload, rows))
    if not args.no_plot:
        title = f"{s['model']} {s['dtype']} on {env['device_name']}: ratio {ipcv.ratio}, P={ipcv.prune_layer}, A={ipcv.as_layers}"
        try:
            written = plot(files.path(".png"), case_results, title)
        except ImportError as error:  # matplotlib is optional (the "bench" extra): keep the numbers
            print(f"no plot: {error}", file=sys.stderr)
            written = None
        if written is not None:
            files.written.append(written)
    payload["files"] = [str(p) for p in files.written]
    return payload


def run(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: run, print the markdown report and the files written."""
    payload = benchmark(args)
    print(markdown_report(payload, table_rows(payload["cases"], payload["settings"]["variants"])))
    print("wrote " + ", ".join(payload["files"]))
    return 0
