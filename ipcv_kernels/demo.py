"""The main job: run one input through a Qwen2-VL vision tower with and without IPCV.

Default: a built-in 12-block tower (width 640, 10 heads of 64) with seeded random weights and a
448x448 image (1,024 patches). ``--model PATH`` loads a real local Qwen2-VL checkpoint instead and
feeds it a synthetic image through the checkpoint's own image processor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

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


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time (ms) of each run, alternating between them so that load from anything
    else on the machine hits all of them alike; one untimed warm-up each; a progress line."""
    outputs = {label: run() for label, run in runs.items()}
    times: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(repeats):
        print(f"\r  timing: round {i + 1}/{repeats}", end="", flush=True)
        for label, run in runs.items():
            start = time.perf_counter()
            outputs[label] = run()
            times[label].append((time.perf_counter() - start) * 1e3)
    print()
    return {label: statistics.median(t) for label, t in times.items()}, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipcv_kernels demo", description=__doc__)
    parser.add_argument("--model", help="local Qwen2-VL checkpoint directory (default: built-in random tower)")
    parser.add_argument("--image-size", type=int, default=448, help="image side in pixels (default 448)")
    parser.add_argument("--prune-layer", type=int, default=DEMO_CONFIG.prune_layer)
    parser.add_argument("--ratio", type=float, default=DEMO_CONFIG.ratio)
    parser.add_argument("--as-layers", type=int, default=DEMO_CONFIG.as_layers)
    parser.add_argument("--neighbors", type=int, default=DEMO_CONFIG.num_neighbors)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = IPCVConfig(
        prune_layer=args.prune_layer, ratio=args.ratio, as_layers=args.as_layers, num_neighbors=args.neighbors
    )
    dtype = getattr(torch, args.dtype)

    print("loading model ...", flush=True)
    tower, pixels, grid, description = load_inputs(args, dtype)
    print(f"{description}; input grid_thw {grid.tolist()} = {int(grid.prod(-1).sum())} patch tokens")
    print(f"IPCV: {config}")

    def forward():
        with torch.inference_mode():
            return tower(pixels, grid_thw=grid)

    def patched(ipcv_config: IPCVConfig) -> Callable[[], object]:
        def run():
            apply_ipcv(tower, ipcv_config)
            try:
                return forward()
            finally:
                remove_ipcv(tower)

        return run

    zero_config = IPCVConfig(**{**config.__dict__, "ratio": 0.0})
    medians, outputs = time_interleaved({"unpatched": forward, "ipcv": patched(config)}, args.repeats)
    base_ms, ipcv_ms = medians["unpatched"], medians["ipcv"]
    apply_ipcv(tower, config)
    forward()
    tokens = get_ipcv_patch(tower).last_tokens_per_block
    remove_ipcv(tower)
    zero_out = patched(zero_config)()
    base_out = outputs["unpatched"]

    flops_base = qwen2_vl_flops(tower.config, grid.tolist())
    flops_ipcv = qwen2_vl_flops(tower.config, grid.tolist(), config)
    max_diff = (zero_out.pooler_output.float() - base_out.pooler_output.float()).abs().max().item()
    print("\ntokens per block (rows whose outputs each block computes):")
    print("  " + " ".join(str(t) for t in tokens))
    print(f"wall time, unpatched: {base_ms:9.1f} ms")
    print(f"wall time, IPCV:      {ipcv_ms:9.1f} ms   (measured speedup {base_ms / ipcv_ms:.2f}x)")
    print(
        f"FLOPs: {flops_base.total / 1e9:.1f} G -> {flops_ipcv.total / 1e9:.1f} G "
        f"(predicted speedup {predicted_speedup(flops_base, flops_ipcv):.2f}x)"
    )
    print(f"max |unpatched - IPCV(ratio=0)| of the merged output: {max_diff:.3e} (should be ~0)")
    return 0
