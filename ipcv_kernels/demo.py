"""Demo: one input through a Qwen2-VL vision tower with and without IPCV: wall time with its spread,
FLOPs, and the ratio-0 equivalence check.

Default: a built-in 12-block tower (width 640, 10 heads of 64) with seeded random weights and a
448x448 image (1,024 patches). ``--model PATH`` loads a real local Qwen2-VL checkpoint instead and
feeds it a synthetic image through the checkpoint's own image processor.

Timing is the benchmarks' (``ipcv_kernels.bench.harness.time_interleaved``): one warm-up call per
variant, then ``--repeats`` rounds alternating the two. The report gives the medians, the p10-p90
of the per-round times and of the per-round speedups, and the host's load average, and says when
the run is too noisy to trust (``harness.noise_warnings``): on a shared CPU host one run's speedup
can be far from the next one's.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .bench import harness
from .bench.towers import tower_output
from .config import IPCVConfig
from .flops import predicted_speedup, qwen2_vl_flops
from .models import apply_ipcv, get_ipcv_patch, remove_ipcv
from .testing.models import build_qwen2_vl_tower, qwen2_vl_vision_config, sample_pixels

if TYPE_CHECKING:
    from PIL import Image

DEMO_VISION = dict(depth=12, embed_dim=640, num_heads=10, mlp_ratio=4, hidden_size=1024, patch_size=14)
DEMO_CONFIG = IPCVConfig(prune_layer=3, ratio=0.65, as_layers=3, num_neighbors=10)


def synthetic_image(size: int) -> Image.Image:
    """A deterministic RGB test picture (gradients and a disc) for the checkpoint's processor."""
    from PIL import Image

    axis = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    disc = ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05).float()
    rgb = torch.stack([xx, yy, 0.5 * (1 - xx) + 0.5 * disc], -1)
    return Image.fromarray((rgb * 255).to(torch.uint8).numpy())


def load_inputs(args: argparse.Namespace, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """``(tower, pixel_values, grid_thw, description)`` for the chosen model."""
    if args.model:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
        processor = AutoProcessor.from_pretrained(args.model)
        images = processor.image_processor(images=[synthetic_image(args.image_size)], return_tensors="pt")
        tower = model.model.visual.eval()
        return tower, images["pixel_values"].to(dtype), images["image_grid_thw"], f"checkpoint {args.model}"
    config = qwen2_vl_vision_config("sdpa", **DEMO_VISION)
    tower = build_qwen2_vl_tower(config, dtype=dtype, seed=args.seed)
    side = args.image_size // config.patch_size // config.spatial_merge_size * config.spatial_merge_size
    pixels, grid = sample_pixels(config, [[1, side, side]], dtype=dtype, seed=args.seed)
    return tower, pixels, grid, "built-in tower (depth 12, width 640, random weights)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's flags."""
    parser.add_argument("--model", help="local Qwen2-VL checkpoint directory (default: the built-in random tower)")
    parser.add_argument("--image-size", type=int, default=448, help="image side in pixels")
    parser.add_argument("--prune-layer", type=int, default=DEMO_CONFIG.prune_layer, help="IPCV prune layer P")
    parser.add_argument("--ratio", type=float, default=DEMO_CONFIG.ratio, help="IPCV ratio: fraction of tokens dropped")
    parser.add_argument(
        "--as-layers", type=int, default=DEMO_CONFIG.as_layers, help="IPCV attention-stabilisation blocks"
    )
    parser.add_argument(
        "--neighbors", type=int, default=DEMO_CONFIG.num_neighbors, help="IPCV kept neighbours per dropped token"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (after one warm-up call each)")
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default="float32", help="weights and inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in tower's weights and the input")
    parser.add_argument("--no-progress", action="store_true", help="show no progress bar")


def spread_text(spread: harness.Spread, unit: str, digits: int) -> str:
    """``"p10-p90 1.0-2.0 ms"`` of a spread."""
    return f"p10-p90 {spread.p10:.{digits}f}-{spread.p90:.{digits}f}{unit}"


def run(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand: time the tower with and without IPCV, then check ratio 0."""
    config = IPCVConfig(
        prune_layer=args.prune_layer, ratio=args.ratio, as_layers=args.as_layers, num_neighbors=args.neighbors
    )
    dtype = harness.DTYPES[args.dtype]

    print("loading model ...", flush=True)
    tower, pixels, grid, description = load_inputs(args, dtype)
    print(f"{description}; input grid_thw {grid.tolist()} = {int(grid.prod(-1).sum())} patch tokens")
    print(f"IPCV: {config}")

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return tower_output(tower(pixels, grid_thw=grid))

    def select(variant: str) -> None:
        # Outside the timed region: patching is set-up, not the forward being compared.
        if variant == "ipcv":
            apply_ipcv(tower, config)
        else:
            remove_ipcv(tower)

    with harness.Progress(2 * args.repeats, "demo timing", enabled=not args.no_progress) as bar:
        timings = harness.time_interleaved(
            {"unpatched": forward, "ipcv": forward},
            pixels.device,
            warmup=1,
            repeats=args.repeats,
            before_each=select,
            progress=bar.update,
        )
    load = harness.load_average()
    base, ipcv = timings["unpatched"], timings["ipcv"]
    speedups = harness.Spread.of(harness.round_speedups(base, ipcv))

    apply_ipcv(tower, config)
    forward()
    tokens = get_ipcv_patch(tower).last_tokens_per_block
    apply_ipcv(tower, replace(config, ratio=0.0))
    zero_out = forward()
    remove_ipcv(tower)
    base_out = forward()

    flops_base = qwen2_vl_flops(tower.config, grid.tolist())
    flops_ipcv = qwen2_vl_flops(tower.config, grid.tolist(), config)
    max_diff = (zero_out.float() - base_out.float()).abs().max().item()
    base_spread, ipcv_spread = harness.Spread.of(base.samples_ms), harness.Spread.of(ipcv.samples_ms)
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
    print(f"{harness.usable_cores()} usable core(s)")
    warnings = harness.noise_warnings({"IPCV": speedups}, load)
    if warnings:
        print("TOO NOISY TO TRUST: " + "; ".join(warnings) + ". Rerun on a quieter host or with more --repeats.")
    else:
        print(
            f"spread within limits (speedup p10-p90 within {harness.NOISY_SPEEDUP_SPREAD:.0%} of its median, "
            "load average not above the usable cores)"
        )
    print(
        f"FLOPs: {flops_base.total / 1e9:.1f} G -> {flops_ipcv.total / 1e9:.1f} G "
        f"(predicted speedup {predicted_speedup(flops_base, flops_ipcv):.2f}x)"
    )
    print(f"max |unpatched - IPCV(ratio=0)| of the merged output: {max_diff:.3e} (should be ~0)")
    return 0
