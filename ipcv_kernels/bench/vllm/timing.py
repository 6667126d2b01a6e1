"""The timed run: every case's measures, interleaved round by round, with their FLOP bounds."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...flops import predicted_speedup
from ...ops import available_backends
from .. import environment, measure, progress, results
from ..calls import Case
from ..vit import PLANNED_OPS
from .cases import (
    MEASURES,
    PROMPT_MARGIN,
    VARIANTS,
    explicit_ipcv_flags,
    image_pixels,
    ipcv_from_args,
    preset_vision_config,
    target_from_args,
)
from .checks import check_case
from .engine import Engine, bind_threads, random_image, save_checkpoint, start_engine
from .reference import Reference
from .report import markdown_report, plot, table_rows


def run_case(
    engine: Engine,
    reference: Reference,
    case: Case,
    size: tuple[int, int],
    *,
    warmup: int,
    repeats: int,
    check: bool,
    stop_on_check_failure: bool,
    dtype: torch.dtype,
    device: torch.device,
    bar: progress.Progress,
) -> dict[str, Any]:
    """Check, then time both measures of both variants interleaved, on new images of ``size``
    (height, width) pixels, which the tower gets as ``case``; everything JSON-ready."""
    result: dict[str, Any] = {
        "case": case.name,
        "image": list(size),
        "grid_thw": [list(g) for g in case.grid_thw],
        "tiles_per_image": list(case.tiles_per_image),
        "tokens": case.tokens,
    }
    if check:
        checks = check_case(engine, reference, engine.image(*size), dtype)
        failed = checks.pop("failed")
        result["checks"] = checks
        if failed:
            message = f"case {case.name}: outputs disagree beyond {checks['bound']:.2e}: {failed}"
            if stop_on_check_failure:
                raise RuntimeError(message)
            print(f"WARNING: {message}; timing it anyway (--on-check-failure warn)", file=sys.stderr)
    else:
        result["checks"] = None

    # The call of each name, built before it runs (outside the timed region) on new inputs.
    pending: dict[str, Callable[[], None]] = {}

    def before_each(name: str) -> None:
        quantity, variant = name.split("/")
        engine.select(variant)
        if quantity == "encoder":
            pending[name] = engine.encoder_call(engine.inputs(engine.image(*size)))
        else:
            pending[name] = engine.ttft_call(variant, engine.image(*size))

    names = [f"{m}/{v}" for m in MEASURES for v in VARIANTS]
    engine.vllm_ttft_ms.clear()
    timings = measure.time_interleaved(
        {name: (lambda name=name: pending.pop(name)()) for name in names},
        device,
        warmup=warmup,
        repeats=repeats,
        before_each=before_each,
        progress=bar.update,
    )
    # One more, untimed, IPCV encoder call: its pruned counts per block.
    engine.select("ipcv")
    engine.encoder_call(engine.inputs(engine.image(*size)))()
    result["ipcv_tokens_per_block"] = engine.tokens_per_block()

    flops = {v: reference.calls.flops(case, engine.configs[v]) for v in VARIANTS}
    bound = predicted_speedup(flops["unpatched"], flops["ipcv"])
    result["kept_tokens"] = flops["ipcv"].kept_tokens
    spreads: dict[str, measure.Spread] = {}
    for quantity in MEASURES:
        entry: dict[str, Any] = {}
        for v in VARIANTS:
            stats = timings[f"{quantity}/{v}"].summary()
            if quantity == "encoder":
                stats["gflops"] = flops[v].total / 1e9
                stats["tflops_per_s"] = flops[v].total / (stats["median_ms"] * 1e-3) / 1e12
            else:
                # The timed calls are the last ``repeats`` of this variant (after its warm-ups).
                reported = engine.vllm_ttft_ms.get(v, [])[-repeats:]
                stats["vllm_first_token_latency_ms"] = reported
                stats["vllm_first_token_latency_median_ms"] = (
                    measure.Timing(tuple(reported)).median_ms if reported else None
                )
            entry[v] = stats
        base, other = timings[f"{quantity}/unpatched"], timings[f"{quantity}/ipcv"]
        rounds = measure.Spread.of(measure.round_speedups(base, other))
        spreads[quantity] = rounds
        entry["speedup"] = base.median_ms / other.median_ms
        entry["speedup_min"] = base.min_ms / other.min_ms
        entry["speedup_p10"], entry["speedup_p90"] = rounds.p10, rounds.p90
        result[quantity] = entry
    encoder_ms = result["encoder"]["unpatched"]["median_ms"]
    ttft_ms = result["ttft"]["unpatched"]["median_ms"]
    result["encoder"]["bound"] = bound
    # Amdahl: what IPCV leaves unchanged (processing, prefill) stays; the encoder share shrinks by
    # the FLOP bound. The unpatched encoder share is measured, clamped to the whole request.
    share = min(encoder_ms, ttft_ms)
    result["ttft"]["bound"] = ttft_ms / (ttft_ms - share + share / bound)
    result["ttft"]["encoder_share"] = share / ttft_ms
    for quantity in MEASURES:
        result[quantity]["efficiency"] = result[quantity]["speedup"] / result[quantity]["bound"]
    result["load_average"] = environment.load_average()
    result["noise_warnings"] = measure.noise_warnings(spreads, result["load_average"])
    return result


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; write the result files and return the payload.

    ``args.command_line`` (set by ``ipcv_kernels.__main__``) is recorded as the reproduce command.
    """
    # The benchmark times calls into the engine from this process (apply_model runs its function
    # in-process), and the vLLM CPU KV cache only needs room for one short request.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    bind_threads(args.threads)
    load_at_start = environment.load_average()
    dtype = environment.DTYPES[args.dtype]
    target = target_from_args(args)
    ipcv = ipcv_from_args(args, target.row)
    takes_grid_thw = target.row.kind.takes_grid_thw
    cases_text = list(args.cases)
    for text in cases_text:  # refused before anything is built
        image_pixels(text, False, None)
    # A Qwen preset's tower is known before its checkpoint is saved: its processor makes room for
    # the largest image (a row's tiny checkpoint holds the tests' small images; other call kinds'
    # processors size images to the tower themselves).
    preset_config = preset_vision_config(target)
    max_pixels = 0
    if preset_config is not None:
        ipcv.check_depth(getattr(preset_config, "depth", None) or preset_config.num_hidden_layers)
        for text in cases_text:
            height, width = image_pixels(text, takes_grid_thw, preset_config)
            max_pixels = max(max_pixels, height * width)
    with tempfile.TemporaryDirectory(prefix="ipcv-bench-vllm-") as directory:
        checkpoint = save_checkpoint(target, args.seed, max_pixels, Path(directory))
        reference = Reference(checkpoint, dtype, torch.device("cpu"))
        ipcv.check_depth(reference.depth)
        vision_config = reference.vision_config
        sizes = [image_pixels(text, takes_grid_thw, vision_config) for text in cases_text]
        images = [random_image(*size, args.seed) for size in sizes]
        cases = [reference.case(text, image) for text, image in zip(cases_text, images, strict=True)]
        # A preset's engine makes room for its longest prompt (the tiny checkpoints' fit the default).
        max_model_len = 0
        if target.preset is not None:
            max_model_len = max(reference.prompt_tokens(image) for image in images) + PROMPT_MARGIN
        engine = start_engine(args, target, ipcv, checkpoint, max_model_len)
        device = engine.device()
        reference.to(device)
        files = results.ResultFiles(args.out, args.name or f"vllm_{device.type}")
        case_results = []
        total = len(cases) * len(MEASURES) * len(VARIANTS) * args.repeats
        with progress.Progress(total, "bench_vllm", enabled=not args.no_progress) as bar:
            for index, (case, size) in enumerate(zip(cases, sizes, strict=True)):
                bar.describe(f"{case.name} ({case.tokens} tokens)")
                case_results.append(
                    run_case(
                        engine,
                        reference,
                        case,
                        size,
                        warmup=args.warmup,
                        repeats=args.repeats,
                        check=args.check == "all" or (args.check == "first" and index == 0),
                        stop_on_check_failure=args.on_check_failure == "stop",
                        dtype=dtype,
                        device=device,
                        bar=bar,
                    )
                )
        del engine, reference

    import vllm

    env = {
        **environment.environment(device),
        "load_average_start": load_at_start,
        "vllm": vllm.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
    }
    payload = {
        "benchmark": "vllm",
        "environment": env,
        "settings": {
            "model": target.name,
            "family": target.row.id,
            "language_model": "ipcv_kernels.vllm.testing.VLLM_TEXT",
            "dtype": args.dtype,
            "cases": cases_text,
            "ipcv": asdict(ipcv),
            "ipcv_source": "flags" if explicit_ipcv_flags(args) else "the family's recommended setting",
            "ipcv_backends": {op: (available_backends(op, device) or ["none"])[0] for op in PLANNED_OPS},
            "vision_config": vision_config.to_dict(),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "check": args.check,
            "seed": args.seed,
            "command": args.command_line,
        },
        "cases": case_results,
    }
    rows = table_rows(case_results)
    files.write_json(payload)
    files.write_csv(rows)
    files.write_markdown(markdown_report(payload, rows))
    if not args.no_plot:
        title = (
            f"vLLM {env['vllm']}, {target.name} {args.dtype} on {env['device_name']}: ratio {ipcv.ratio}, "
            f"P={ipcv.prune_layer}, A={ipcv.as_layers}"
        )
        try:
            files.written.append(plot(files.path(".png"), case_results, title))
        except ImportError as error:  # matplotlib is optional (the "bench" extra): keep the numbers
            print(f"no plot: {error}", file=sys.stderr)
    payload["files"] = [str(p) for p in files.written]
    return payload
