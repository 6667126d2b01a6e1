"""``python -m ipcv_kernels fidelity``: how much of a tower's output survives each IPCV setting.

Runs the unpatched tower and every method / setting of a grid on the same images, and reports
the cosine similarity of the pruned per-token features to the unpruned ones (all, kept and
dropped tokens; mean and worst image), the relative L2 error, the FLOP ratio and wall time.
Fidelity to the encoder output is a cheap, model-specific proxy, not task accuracy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .._help_text import plain_text
from ..bench import environment
from ..selectors import DEFAULT_SELECTION
from .evaluate import METHODS, FidelityResult, Grid, default_grid, evaluate_fidelity
from .report import write_results
from .subjects import DEFAULT_PRESET, PRESETS, FidelityError, load_subject

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Under the working directory, never inside the package or the repository's committed results.
DEFAULT_OUT = Path("ipcv_fidelity")


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text}")
    return value


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in its messages
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fidelity`` flags (every one with help; defaults shown by the formatter)."""
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--preset",
        choices=list(PRESETS),
        help=f"built-in tiny tower with seeded random weights (default {DEFAULT_PRESET} unless --model)",
    )
    model.add_argument(
        "--model",
        type=Path,
        help="local checkpoint directory of a supported family (loaded with transformers' Auto "
        "classes; images go through its own image processor)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="directory of image files; each sub-directory of image files is one video (frames in "
        "name order). Default: built-in synthetic images and, for Qwen families, a synthetic video",
    )
    parser.add_argument("--num-images", type=_at_least(0), default=2, help="synthetic images without --images")
    parser.add_argument(
        "--video-frames",
        type=_at_least(0),
        default=4,
        help="frames of the synthetic video without --images (0: none; only the Qwen families take videos)",
    )
    parser.add_argument(
        "--image-size",
        type=_at_least(1),
        help="longer image side in pixels before the processor (default 32 for presets, 448 for --model)",
    )
    parser.add_argument("--ratios", type=_ratio, nargs="+", help="ratios r (default: 0 to 0.8 and the family's)")
    parser.add_argument(
        "--prune-layers",
        type=_at_least(1),
        nargs="+",
        help="prune layers P, each in [1, depth) (default: the family's recommended P and P +- 1)",
    )
    parser.add_argument(
        "--as-layers",
        type=_at_least(0),
        nargs="+",
        help="stabilisation blocks A for the ipcv method (default: the family's A and A/2; clamped to depth - P)",
    )
    parser.add_argument("--neighbors", type=_at_least(1), nargs="+", help="neighbours k (default: the family's k)")
    parser.add_argument("--methods", choices=METHODS, nargs="+", default=list(METHODS), help="methods to compare")
    parser.add_argument(
        "--selections",
        nargs="+",
        default=[DEFAULT_SELECTION],
        help="token selectors to compare, each with every method (IPCVConfig.selection: diff, norm, random, "
        "uniform, or one registered by an installed library through the ipcv_kernels.selectors entry points)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the tower")
    parser.add_argument("--device", default="cpu", help="torch device of the tower, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the presets' weights and the synthetic images")
    parser.add_argument("--repeats", type=_at_least(1), default=1, help="timed forwards per sample and setting")
    parser.add_argument("--threads", type=_at_least(1), help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the result files")
    parser.add_argument("--stem", default="fidelity", help="file name stem of the result files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for scripts and logs)")


def _grid(args: argparse.Namespace, default: Grid) -> Grid:
    return Grid(
        ratios=tuple(sorted(set(args.ratios))) if args.ratios else default.ratios,
        prune_layers=tuple(sorted(set(args.prune_layers))) if args.prune_layers else default.prune_layers,
        as_layers=tuple(sorted(set(args.as_layers))) if args.as_layers else default.as_layers,
        neighbors=tuple(sorted(set(args.neighbors))) if args.neighbors else default.neighbors,
        selections=tuple(dict.fromkeys(args.selections)),
    )


def run(args: argparse.Namespace) -> int:
    """Load, measure, write the result files; print where they are. ``2`` on bad input."""
    environment.configure_threads(args.threads)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise FidelityError(f"--device: {args.device} requested but CUDA is not available")
        subject = load_subject(
            preset=args.preset if args.preset or args.model else DEFAULT_PRESET,
            model=args.model,
            images=args.images,
            num_images=args.num_images,
            video_frames=args.video_frames,
            image_size=args.image_size,
            dtype=DTYPES[args.dtype],
            device=args.device,
            seed=args.seed,
        )
        result: FidelityResult = evaluate_fidelity(
            subject,
            _grid(args, default_grid(subject)),
            methods=tuple(dict.fromkeys(args.methods)),
            repeats=args.repeats,
            progress=not args.no_progress,
        )
    except FidelityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result.environment = environment.environment(next(subject.tower.parameters()).device)
    written = write_results(result, args.out, args.stem)
    best = [row for row in result.rows if row.pareto and row.ratio > 0]
    print(f"{len(result.rows)} settings on {len(subject.samples)} samples of {subject.name}")
    for row in best:
        print(
            f"  front: {row.method:17s} {row.selection:8s} P={row.prune_layer} r={row.ratio:.2f} A={row.as_layers} "
            f"k={row.num_neighbors}  cos={row.cosine_all_mean:.4f} (worst {row.cosine_all_worst:.4f})  "
            f"FLOP ratio {row.flop_ratio:.3f}"
        )
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def parser() -> argparse.ArgumentParser:
    """The standalone parser (``main``); the package CLI adds the same flags to its subcommand."""
    p = argparse.ArgumentParser(
        prog="python -m ipcv_kernels fidelity",
        description=plain_text(__doc__),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args(argv))
