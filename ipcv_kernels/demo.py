"""Demo: one input through a vision tower with and without IPCV: wall time with its spread,
FLOPs, and the ratio-0 equivalence check.

Default: a built-in 12-block Qwen2-VL tower (width 640, 10 heads of 64; the family table's preset
``qwen2-vl-demo``) with seeded random weights and a 448x448 image (1,024 patches). ``--preset NAME`` takes a benchmark preset of any family
instead (a preset of the family table, ``ipcv_kernels.families``: e.g. ``clip-vit-l-336-d8``, ``llava-1.5-7b``,
``siglip-so400m-384-d8``, ``internvit-300m-d8``, ``qwen2.5-vl-7b``; random weights), and
``--model PATH`` the vision tower of a local checkpoint of any supported family (a full model or a
saved bare tower, found through the family table and loaded as ``bench --model`` loads it:
``ipcv_kernels.bench.towers``). Either is called and FLOP-counted as the benchmark does
(``ipcv_kernels.bench.calls``): one image at the tower's native resolution for CLIP / SigLIP /
InternViT / Idefics3 (or the preset's own case: anyres crops, padded sub-images), ``--image-size``
for the Qwen towers; a full LLaVA-family model's tower read at its ``vision_feature_layer``, the
blocks after it run by neither variant (the demo says so). The pixels are seeded random, as the
benchmark's (a tower's speed does not depend on them, and the ratio-0 check holds for any input).
Both take the family's recommended IPCV setting unless flags say otherwise.

Timing is the benchmarks' (``ipcv_kernels.bench.measure.time_interleaved``): one warm-up call per
variant, then ``--repeats`` rounds alternating the two. The report gives the medians, the p10-p90
of the per-round times and of the per-round speedups, and the host's load average, and says when
the run is too noisy to trust (``measure.noise_warnings``): on a shared CPU host one run's speedup
can be far from the next one's.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from .bench import environment, measure, progress
from .bench.calls import Case, GridCalls, TowerCalls, load_calls
from .config import IPCVConfig
from .families import presets
from .flops import predicted_speedup

# The built-in tower: a preset of the family table (Qwen2-VL blocks, depth 12, width 640), and the
# setting the demo shows on it (prune layer 3, 3 stabilisation blocks of its 12).
DEMO_PRESET = "qwen2-vl-demo"
DEMO_CONFIG = IPCVConfig(prune_layer=3, ratio=0.65, as_layers=3, num_neighbors=10)


def load_inputs(args: argparse.Namespace, dtype: torch.dtype) -> tuple[TowerCalls, tuple[Case, tuple], str]:
    """``(the tower's calls, its inputs, description)`` for the chosen tower."""
    cpu = torch.device("cpu")
    preset = args.preset or DEMO_PRESET
    calls = load_calls(args.model, preset, dtype=dtype, device=cpu, seed=args.seed)
    if args.model:
        source = f"checkpoint {args.model} ({calls.model_family.name}, depth {calls.depth}, its own weights"
    else:
        built_in = "built-in tower, " if args.preset is None else ""
        source = f"{built_in}preset {preset} ({calls.model_family.name}, depth {calls.depth}, random weights"
    native = calls.default_cases()
    case = calls.parse_case(native[0] if native else f"{args.image_size}x{args.image_size}")
    return calls, calls.inputs(case, args.seed, cpu, dtype), f"{source}, random pixels)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's flags."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        type=Path,
        help="local checkpoint directory of any supported family, a full model or a bare tower: its vision tower "
        "(default: the built-in random tower)",
    )
    source.add_argument(
        "--preset",
        choices=sorted(presets()),
        help=f"a benchmark preset of any family, random weights (default: the built-in tower, {DEMO_PRESET})",
    )
    parser.add_argument(
        "--image-size", type=int, default=448, help="image side in pixels (Qwen towers; the others take their own)"
    )
    default = f"default: {DEMO_CONFIG} field, or the preset's or checkpoint's family's recommended one"
    parser.add_argument("--prune-layer", type=int, help=f"IPCV prune layer P ({default})")
    parser.add_argument("--ratio", type=float, help=f"IPCV ratio: fraction of tokens dropped ({default})")
    parser.add_argument("--as-layers", type=int, help=f"IPCV attention-stabilisation blocks ({default})")
    parser.add_argument("--neighbors", type=int, help=f"IPCV kept neighbours per dropped token ({default})")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (after one warm-up call each)")
    parser.add_argument("--dtype", choices=sorted(environment.DTYPES), default="float32", help="weights and inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in tower's weights and the input")
    parser.add_argument("--no-progress", action="store_true", help="show no progress bar")


def spread_text(spread: measure.Spread, unit: str, digits: int) -> str:
    """``"p10-p90 1.0-2.0 ms"`` of a spread."""
    return f"p10-p90 {spread.p10:.{digits}f}-{spread.p90:.{digits}f}{unit}"


def run(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand: time the tower with and without IPCV, then check ratio 0."""
    dtype = environment.DTYPES[args.dtype]

    print("loading model ...", flush=True)
    calls, inputs, description = load_inputs(args, dtype)
    case = inputs[0]
    base = IPCVConfig(**calls.model_family.recommended) if args.preset or args.model else DEMO_CONFIG
    config = IPCVConfig(
        prune_layer=args.prune_layer if args.prune_layer is not None else base.prune_layer,
        ratio=args.ratio if args.ratio is not None else base.ratio,
        as_layers=args.as_layers if args.as_layers is not None else base.as_layers,
        num_neighbors=args.neighbors if args.neighbors is not None else base.num_neighbors,
    )
    if case.grid_thw:
        print(f"{description}; input grid_thw {[list(g) for g in case.grid_thw]} = {case.tokens} patch tokens")
    else:
        padding = f" ({sum(case.tile_padding)} of them padding)" if any(case.tile_padding) else ""
        print(
            f"{description}; input {case.tiles_per_image[0]} tile(s) of {case.tile_tokens} tokens = "
            f"{case.tokens} tokens{padding}"
        )
    if calls.reading() is not None:
        print(f"as the full model calls the tower: {calls.reading()}")
    print(f"IPCV: {config}")

    def forward() -> torch.Tensor:
        return calls.forward(inputs)

    variants = {"unpatched": None, "ipcv": config}
    with progress.Progress(2 * args.repeats, "demo timing", enabled=not args.no_progress) as bar:
        timings = measure.time_interleaved(
            dict.fromkeys(variants, forward),
            inputs[1][0].device,
            warmup=1,
            repeats=args.repeats,
            before_each=lambda variant: calls.switch(variants[variant]),
            progress=bar.update,
        )
    load = environment.load_average()
    base, ipcv = timings["unpatched"], timings["ipcv"]
    speedups = measure.Spread.of(measure.round_speedups(base, ipcv))

    calls.switch(config)
    forward()
    tokens = calls.tokens_per_block()
    calls.switch(replace(config, ratio=0.0))
    zero_out = forward()
    calls.switch(None)
    base_out = forward()

    flops_base = calls.flops(case, None)
    flops_ipcv = calls.flops(case, config)
    max_diff = (zero_out.float() - base_out.float()).abs().max().item()
    base_spread, ipcv_spread = measure.Spread.of(base.samples_ms), measure.Spread.of(ipcv.samples_ms)
    print("\ntokens per block (rows whose outputs each block computes):")
    print("  " + " ".join(str(t) for t in tokens))
    print(f"wall time, unpatched: {base.median_ms:9.1f} ms   ({spread_text(base_spread, ' ms', 1)})")
    print(f"wall time, IPCV:      {ipcv.median_ms:9.1f} ms   ({spread_text(ipcv_spread, ' ms', 1)})")
    print(
        f"measured speedup {base.median_ms / ipcv.median_ms:.2f}x (ratio of the medians; per round: median "
        f"{speedups.median:.2f}x, {spread_text(speedups, 'x', 2)}, over {args.repeats} interleaved rounds)"
    )
    if load is not None:
        print(f"host load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min), ", end="")
    print(f"{environment.usable_cores()} usable core(s)")
    warnings = measure.noise_warnings({"IPCV": speedups}, load)
    if warnings:
        print("TOO NOISY TO TRUST: " + "; ".join(warnings) + ". Rerun on a quieter host or with more --repeats.")
    else:
        print(
            f"spread within limits (speedup p10-p90 within {measure.NOISY_SPEEDUP_SPREAD:.0%} of its median, "
            "load average not above the usable cores)"
        )
    print(
        f"FLOPs: {flops_base.total / 1e9:.1f} G -> {flops_ipcv.total / 1e9:.1f} G "
        f"(predicted speedup {predicted_speedup(flops_base, flops_ipcv):.2f}x)"
    )
    compared = "merged output" if isinstance(calls, GridCalls) else "features read"
    if calls.reading() is None and not isinstance(calls, GridCalls):
        compared = "last hidden state"
    print(f"max |unpatched - IPCV(ratio=0)| of the {compared}: {max_diff:.3e} (should be ~0)")
    return 0
