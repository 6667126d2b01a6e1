"""The ``bench-vllm`` subcommand: its flags and its run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import environment, results
from .cases import DEFAULT_CASES, DEFAULT_PRESET, PRESETS, VLLM_FAMILIES
from .engine import VLLM_MISSING, vllm_available
from .report import markdown_report, table_rows
from .timing import benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench-vllm`` subcommand's flags."""
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--preset",
        choices=PRESETS,
        default=DEFAULT_PRESET,
        help="the vision tower's shape (a family-table preset of a vLLM row), with a processor of its size "
        "(the language model is always the tiny one)",
    )
    model.add_argument(
        "--family",
        choices=VLLM_FAMILIES,
        default=None,
        help="instead of a preset: the family-table row's tiny vLLM checkpoint as the tests save it "
        "(ipcv_kernels.vllm.testing), any call kind",
    )
    parser.add_argument("--dtype", choices=sorted(environment.DTYPES), default="float32", help="vLLM's dtype")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        help="images in pixels, HxW, one per request (rounded to multiples of 28 for Qwen towers as their "
        "processor does; other families' processors crop or tile them as they do in serving)",
    )
    parser.add_argument(
        "--ratio", type=float, help="IPCV ratio: fraction of tokens dropped (default: the family's recommended)"
    )
    parser.add_argument("--prune-layer", type=int, help="IPCV prune layer P (default: the family's recommended)")
    parser.add_argument(
        "--as-layers", type=int, help="IPCV attention-stabilisation blocks (default: the family's recommended)"
    )
    parser.add_argument(
        "--neighbors", type=int, help="IPCV kept neighbours per dropped token (default: the family's recommended)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per measure, variant and case")
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds per case")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cores to run on: torch threads, OMP_NUM_THREADS and vLLM's CPU threads bound to the first N "
        "usable cores (VLLM_CPU_OMP_THREADS_BIND); environment variables already set win (default: every usable core)",
    )
    parser.add_argument(
        "--check",
        choices=("first", "all", "none"),
        default="first",
        help="cases checked before timing (ratio 0 vs unpatched, vLLM vs transformers; first: the first case only)",
    )
    parser.add_argument(
        "--on-check-failure",
        choices=("stop", "warn"),
        default="stop",
        help="warn: record the failed check and time the case anyway",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument(
        "--out",
        type=Path,
        default=results.default_out("vllm"),
        help="directory of the result files, relative to the current directory "
        "(--out benchmarks/results rewrites the committed results)",
    )
    parser.add_argument("--name", default=None, help="file stem (default: vllm_<device type>)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="show no progress bar")


def run(args: argparse.Namespace) -> int:
    """The ``bench-vllm`` subcommand: run, print the markdown report and the files written.

    Exits with status 1 and a message naming what to install when vLLM is not importable."""
    if not vllm_available():
        print(f"error: {VLLM_MISSING}", file=sys.stderr)
        return 1
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    payload = benchmark(args)
    print(markdown_report(payload, table_rows(payload["cases"])))
    print("wrote " + ", ".join(payload["files"]))
    return 0
