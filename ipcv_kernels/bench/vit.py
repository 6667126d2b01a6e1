"""End-to-end benchmark of a Qwen2-VL vision tower: unpatched vs the paper's formulation vs IPCV.

Entry points: ``python benchmarks/bench_vit.py ...`` and ``python -m ipcv_kernels bench ...``
both call ``main(argv)``. Three variants run on the same tower, interleaved round by round:

- ``unpatched`` (a): the model as built.
- ``paper`` (b): the paper code's formulation: IPCV with ``as_queries="all"`` (the model's own
  block on the full reconstructed sequence in the stabilisation blocks, dropped rows discarded
  afterwards) and the ``"torch"`` planning backend (a dense distance matrix per tile, like
  ``torch.cdist``).
- ``ipcv`` (c): IPCV with kept queries only and ``backend="auto"`` for every op (the fastest
  backend registered for the device).
- optional, ``ipcv_<backend>`` (e.g. ``ipcv_torch_varlen``, ``ipcv_flash_attn``, ``ipcv_sdpa``):
  (c) with that ``ngr_attention`` backend in the stabilisation blocks, so that one run compares
  attention kernels end to end (``--variants unpatched paper ipcv ipcv_torch_varlen``).

Before timing, every case is checked: (b) and (c) must agree, and (c) at ``ratio=0`` must equal
(a) (``--check first`` does the ratio-0 forward for the first case only). The bound is the FLOP
model's speedup (``ipcv_kernels.flops``); ``efficiency`` = measured speedup / bound.

Weights are seeded random (speed does not depend on their values) unless ``--model PATH`` loads a
real checkpoint's vision tower from a local directory.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..flops import FlopReport, grid_seq_lens, predicted_speedup, qwen2_vl_flops, vit_flops
from ..models import apply_ipcv, get_ipcv_patch, remove_ipcv
from ..ops import available_backends
from ..testing import tolerance
from . import harness
from .presets import MODEL_PRESETS, PRESET_FAMILIES, SUITES

if TYPE_CHECKING:
    from transformers import PretrainedConfig

VARIANTS = ("unpatched", "paper", "ipcv")
# (c) with a named ngr_attention backend in the stabilisation blocks: "ipcv_<backend>".
ATTENTION_VARIANT_PREFIX = "ipcv_"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_OUT = harness.REPO_ROOT / "benchmarks" / "results"
PLANNED_OPS = ("plan", "knn", "ngr_reconstruct", "ngr_attention")


# -- cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One input: ``grid_thw`` rows (``t, h, w`` in patches) for the tower."""

    name: str
    kind: str  # "image", "batch" or "video"
    grid_thw: tuple[tuple[int, int, int], ...]

    @property
    def tokens(self) -> int:
        return sum(t * h * w for t, h, w in self.grid_thw)


_CASE = re.compile(r"^(\d+)x(\d+)(?:\*(\d+)|@(\d+))?$")


def _patches(pixels: int, patch: int, merge: int) -> int:
    # Like Qwen2-VL's processor (``smart_resize``): round to the nearest multiple of patch * merge.
    unit = patch * merge
    return max(1, round(pixels / unit)) * merge


def parse_case(text: str, vision_config: Any) -> Case:
    """``"HxW"`` one image, ``"HxW*B"`` ``B`` images, ``"HxW@F"`` a video of ``F`` frames.

    Sizes are in pixels, rounded to the nearest multiple of ``patch_size * spatial_merge_size``
    (28 for Qwen2-VL); ``F`` must be a multiple of ``temporal_patch_size``.
    """
    match = _CASE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"cases: expected 'HxW', 'HxW*B' or 'HxW@F', got {text!r}")
    height, width, batch, frames = match.groups()
    c = vision_config
    h = _patches(int(height), c.patch_size, c.spatial_merge_size)
    w = _patches(int(width), c.patch_size, c.spatial_merge_size)
    if frames is not None:
        frames = int(frames)
        if frames < 1 or frames % c.temporal_patch_size:
            raise ValueError(f"cases: frames must be a positive multiple of {c.temporal_patch_size}, got {text!r}")
        return Case(text, "video", ((frames // c.temporal_patch_size, h, w),))
    count = int(batch) if batch is not None else 1
    if count < 1:
        raise ValueError(f"cases: batch size must be >= 1, got {text!r}")
    return Case(text, "batch" if count > 1 else "image", ((1, h, w),) * count)


# -- towers ---------------------------------------------------------------------------------------
def vision_config_from_preset(name: str, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """A ``Qwen2VLVisionConfig`` for a ``MODEL_PRESETS`` name."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    if name not in MODEL_PRESETS:
        raise ValueError(f"preset must be one of {list(MODEL_PRESETS)}, got {name!r}")
    config_class = Qwen2_5_VLVisionConfig if PRESET_FAMILIES.get(name) == "qwen2_5_vl" else Qwen2VLVisionConfig
    config = config_class(**MODEL_PRESETS[name])
    config._attn_implementation = attn_implementation
    return config


def build_tower(
    vision_config: PretrainedConfig, *, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> nn.Module:
    """The tower with seeded random weights, created directly on ``device`` (no host copy)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    tower_class = (
        Qwen2_5_VisionTransformerPretrainedModel
        if vision_config.model_type == "qwen2_5_vl_vision"
        else Qwen2VisionTransformerPretrainedModel
    )
    torch.manual_seed(seed)
    with torch.device(device):
        tower = tower_class(vision_config)
    return tower.to(dtype=dtype).eval()


VISION_PREFIXES = ("model.visual.", "visual.")


def load_vision_tower(
    path: str | Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"
) -> nn.Module:
    """The vision tower of a local Qwen2-VL checkpoint directory, without loading the LLM.

    ``path`` holds either a full Qwen2-VL model (``config.json`` with a ``vision_config`` and
    safetensors shards, as ``save_pretrained`` or the Hub write them) or a saved tower alone
    (``model_type`` ``qwen2_vl_vision``). For a full model only the tensors named
    ``visual.*`` / ``model.visual.*`` are read (shard by shard, through the safetensors index when
    there is one), so a 7B checkpoint costs the ~1.3 GB of its tower, not 16 GB.
    """
    import json

    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    root = Path(path)
    if not (root / "config.json").is_file():
        raise ValueError(f"model: {str(root)!r} is not a directory with a config.json")
    config = AutoConfig.from_pretrained(root)
    if getattr(config, "model_type", None) == "qwen2_vl_vision":
        tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(
            root, dtype=dtype, attn_implementation=attn_implementation
        )
        return tower.to(device).eval()
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        raise ValueError(f"model: {str(root)!r} has no vision_config (not a Qwen2-VL checkpoint)")
    vision_config._attn_implementation = attn_implementation
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in root.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"model: no safetensors files in {str(root)!r}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(root / shard), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix) :]] = handle.get_tensor(key)
    if not state:
        raise ValueError(f"model: no vision-tower tensors ({' or '.join(VISION_PREFIXES)}*) in {str(root)!r}")
    with torch.device("meta"):
        tower = Qwen2VisionTransformerPretrainedModel(vision_config)
    tower.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the rotary inverse frequencies) are not in checkpoints: recompute.
    tower.rotary_pos_emb = type(tower.rotary_pos_emb)(vision_config)
    return tower.to(device=device, dtype=dtype).eval()


def tower_output(output: Any) -> torch.Tensor:
    """The merger's output: ``pooler_output`` (transformers >= 5) or the returned tensor (older)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


# -- variants and checks --------------------------------------------------------------------------
def variant_configs(ipcv: IPCVConfig, variants: Sequence[str] = VARIANTS) -> dict[str, IPCVConfig | None]:
    """The benchmarked variants' configs for one IPCV setting (its ``backend`` fields ignored)."""
    configs: dict[str, IPCVConfig | None] = {
        "unpatched": None,
        "paper": replace(ipcv, as_queries="all", backend="torch", attention_backend="torch"),
        "ipcv": replace(ipcv, as_queries="kept", backend="auto", attention_backend="auto"),
    }
    for variant in variants:
        if variant not in configs:
            attention = attention_variant_backend(variant)
            configs[variant] = replace(configs["ipcv"], attention_backend=attention)
    return {v: configs[v] for v in variants}


def attention_variant_backend(variant: str) -> str:
    """``"torch_varlen"`` of ``"ipcv_torch_varlen"``; ``ValueError`` for other names."""
    if not variant.startswith(ATTENTION_VARIANT_PREFIX) or variant in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS} or ipcv_<ngr_attention backend>")
    return variant.removeprefix(ATTENTION_VARIANT_PREFIX)


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
    """A tower under test and how to run one variant of it."""

    tower: nn.Module
    vision_config: Any
    device: torch.device
    dtype: torch.dtype
    configs: dict[str, IPCVConfig | None]

    def select(self, variant: str) -> None:
        config = self.configs[variant]
        if config is None:
            remove_ipcv(self.tower)
        else:
            apply_ipcv(self.tower, config)

    def inputs(self, case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vision_config
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(case.tokens, patch_dim, generator=generator)
        return pixels.to(self.device, self.dtype), torch.tensor(case.grid_thw, dtype=torch.int64, device=self.device)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return tower_output(self.tower(pixels, grid_thw))


def qwen2_5_window_lengths(t: int, h: int, w: int, merge: int, window: int) -> list[int]:
    """Qwen2.5-VL's attention windows of one ``grid_thw`` row: ``window x window`` merge units from
    the top-left corner of every frame, the last row / column of windows cut by the grid."""
    rows = [min(window, h // merge - r) for r in range(0, h // merge, window)]
    cols = [min(window, w // merge - c) for c in range(0, w // merge, window)]
    return [r * c * merge * merge for _ in range(t) for r in rows for c in cols]


def qwen2_5_vl_flops(vision_config: Any, grid_thw: Sequence[Sequence[int]], config: IPCVConfig | None) -> FlopReport:
    """``vit_flops`` for a ``Qwen2_5_VLVisionConfig``: blocks in ``fullatt_block_indexes`` attend
    per image / frame, the others per window; the gated MLP's three matrices count as a two-matrix
    MLP of 1.5 x ``intermediate_size``. Same conventions as ``qwen2_vl_flops`` otherwise."""
    c = vision_config
    merge = c.spatial_merge_size
    window = c.window_size // merge // c.patch_size

    def report(seq_lens: list[Any]) -> FlopReport:
        return vit_flops(
            c.depth,
            c.hidden_size,
            int(1.5 * c.intermediate_size),
            c.num_heads,
            seq_lens,
            config,
            patch_dim=c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size,
            merger_out=c.out_hidden_size,
            spatial_merge=merge,
        )

    full = report(grid_seq_lens(grid_thw))
    windowed = report([qwen2_5_window_lengths(int(t), int(h), int(w), merge, window) for t, h, w in grid_thw])
    blocks = tuple(full.blocks[i] if i in c.fullatt_block_indexes else windowed.blocks[i] for i in range(c.depth))
    ipcv_only = full.planning + full.restoration
    overhead = ipcv_only + sum(b.overhead for b in blocks)
    total = sum(b.total for b in blocks) + ipcv_only + full.embed + full.merger
    return replace(
        full,
        total=total,
        per_block=tuple(b.total for b in blocks),
        blocks=blocks,
        core=total - overhead,
        overhead=overhead,
    )


def flop_bounds(vision_config: Any, case: Case, configs: dict[str, IPCVConfig | None]) -> dict[str, FlopReport]:
    model_flops = qwen2_5_vl_flops if vision_config.model_type == "qwen2_5_vl_vision" else qwen2_vl_flops
    return {name: model_flops(vision_config, case.grid_thw, config) for name, config in configs.items()}


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
    bar: harness.Progress,
    breakdown: bool = False,
) -> dict[str, Any]:
    """Check, measure memory and time the variants on one case; everything JSON-ready.

    ``breakdown``: one more untimed call per variant, timed stage by stage (``block_breakdown``).
    """
    pixels, grid_thw = bench.inputs(case, seed)
    depth = bench.vision_config.depth
    result: dict[str, Any] = {"case": case.name, "kind": case.kind, "grid_thw": [list(g) for g in case.grid_thw]}
    result["tokens"] = case.tokens

    # Warm-up calls: the first one's output feeds the checks, the last one's peak memory is kept
    # (so one-time allocations such as library workspaces or autotuning do not count).
    outputs: dict[str, torch.Tensor] = {}
    memory: dict[str, harness.PeakMemory] = {}
    kept_per_block: list[int] | None = None
    for variant in variants:
        for call in range(max(1, warmup)):
            bench.select(variant)
            output, peak = harness.measure_peak_memory(lambda: bench.forward(pixels, grid_thw), bench.device)
            if call == 0:
                outputs[variant] = output
            memory[variant] = peak
            del output
        if variant == "ipcv":
            kept_per_block = list(get_ipcv_patch(bench.tower).last_tokens_per_block)

    checks: dict[str, Any] = {"bound": agreement_bound(bench.dtype, depth)}
    if "paper" in outputs and "ipcv" in outputs:
        checks["ipcv_vs_paper"] = relative_error(outputs["ipcv"], outputs["paper"])
        if not checks["ipcv_vs_paper"] <= checks["bound"]:
            # (b) and (c) plan with different backends, which may break a near-tie of scores at the
            # keep / drop cut (or of distances) differently: the spec allows either, and one swapped
            # token moves the output by ~1/sqrt(tokens). Then (c) must match the paper's formulation
            # planned by (c)'s own backends, and (b) vs (c) is kept as information only.
            checks["ipcv_vs_paper_informative"] = checks.pop("ipcv_vs_paper")
            apply_ipcv(bench.tower, replace(bench.configs["ipcv"], as_queries="all"))
            same_plan = bench.forward(pixels, grid_thw)
            checks["ipcv_vs_paper_same_planning"] = relative_error(outputs["ipcv"], same_plan)
    for variant in attention_variants(list(outputs)) if "ipcv" in outputs else ():
        # Same planning as (c), another attention kernel: agreement to round-off.
        checks[f"{variant}_vs_ipcv"] = relative_error(outputs[variant], outputs["ipcv"])
    if check_ratio_zero and "unpatched" in outputs:
        bench.select("ipcv")
        apply_ipcv(bench.tower, replace(bench.configs["ipcv"], ratio=0.0))
        checks["ratio0_vs_unpatched"] = relative_error(bench.forward(pixels, grid_thw), outputs["unpatched"])
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

    timings = harness.time_interleaved(
        {v: (lambda: bench.forward(pixels, grid_thw)) for v in variants},
        bench.device,
        warmup=0,
        repeats=repeats,
        before_each=bench.select,
        progress=bar.update,
    )
    flops = flop_bounds(bench.vision_config, case, {v: bench.configs[v] for v in variants})
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
    if "paper" in variants and "ipcv" in variants:
        result["ipcv_over_paper"] = timings["paper"].median_ms / timings["ipcv"].median_ms
    if breakdown:
        for v in variants:
            bench.select(v)
            result["variants"][v]["breakdown"] = block_breakdown(bench, pixels, grid_thw, flops[v], bench.configs[v])
            # Host-device syncs of one forward (CUDA only): each one idles the GPU while the host
            # launches the next kernels, which matters most for small inputs.
            _, result["variants"][v]["host_syncs"] = harness.count_host_syncs(
                lambda: bench.forward(pixels, grid_thw), bench.device
            )
    return result


def block_breakdown(
    bench: Bench, pixels: torch.Tensor, grid_thw: torch.Tensor, report: FlopReport, config: IPCVConfig | None
) -> dict[str, Any]:
    """Milliseconds, FLOP-model GFLOP and achieved TFLOP/s per stage of one call of the selected
    variant: patch embedding, blocks grouped by kind (``full``, ``stabilised`` / ``stabilised_all``,
    ``pruned``; the planning runs inside block ``P`` and the restoration inside the last block, so
    those get their own stage), merger. Shows where a gap to the FLOP bound sits."""
    tower = bench.tower
    modules = {"embed": tower.patch_embed, **{f"block{i}": b for i, b in enumerate(tower.blocks)}}
    modules["merger"] = tower.merger
    _, ms = harness.time_modules(lambda: bench.forward(pixels, grid_thw), modules, bench.device)
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


# -- reporting ------------------------------------------------------------------------------------
def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def attention_variants(variants: Sequence[str]) -> list[str]:
    return [v for v in variants if v.startswith(ATTENTION_VARIANT_PREFIX)]


def table_rows(cases: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One flat row per case (the CSV and the markdown table)."""
    rows = []
    for case in cases:
        row: dict[str, Any] = {k: case.get(k) for k in ("case", "kind", "tokens", "kept_tokens")}
        for v in variants:
            stats = case["variants"][v]
            row[f"{v}_ms"] = stats["median_ms"]
            row[f"{v}_p10_ms"] = stats["p10_ms"]
            row[f"{v}_p90_ms"] = stats["p90_ms"]
            row[f"{v}_peak_extra_mib"] = _mib(stats["memory"]["peak_extra_bytes"])
            row[f"{v}_host_syncs"] = stats.get("host_syncs")
        for key in (
            "speedup_paper",
            "speedup_paper_min",
            "bound_paper",
            "speedup_ipcv",
            "speedup_ipcv_min",
            "bound_ipcv",
            "efficiency_ipcv",
            "ipcv_over_paper",
            *(f"{kind}_{v}" for v in attention_variants(variants) for kind in ("speedup", "efficiency")),
        ):
            row[key] = case.get(key)
        row["check_ipcv_vs_paper"] = case["checks"].get(
            "ipcv_vs_paper", case["checks"].get("ipcv_vs_paper_informative")
        )
        row["check_ipcv_vs_paper_same_planning"] = case["checks"].get("ipcv_vs_paper_same_planning")
        row["check_ratio0"] = case["checks"].get("ratio0_vs_unpatched")
        row["checks_passed"] = case["checks"]["passed"]
        rows.append(row)
    return rows


MARKDOWN_COLUMNS = (
    harness.Column("case", "case"),
    harness.Column("tokens", "tokens"),
    harness.Column("kept_tokens", "kept"),
    harness.Column("unpatched_ms", "(a) ms", ".1f"),
    harness.Column("paper_ms", "(b) ms", ".1f"),
    harness.Column("ipcv_ms", "(c) ms", ".1f"),
    harness.Column("speedup_paper", "(b) speedup", ".2f"),
    harness.Column("speedup_ipcv", "(c) speedup", ".2f"),
    harness.Column("bound_ipcv", "(c) FLOP bound", ".2f"),
    harness.Column("efficiency_ipcv", "(c) / bound", ".0%"),
    harness.Column("speedup_ipcv_min", "(c) speedup, fastest calls", ".2f"),
    harness.Column("ipcv_over_paper", "(c) vs (b)", ".2f"),
    harness.Column("unpatched_peak_extra_mib", "(a) MiB", ".0f"),
    harness.Column("paper_peak_extra_mib", "(b) MiB", ".0f"),
    harness.Column("ipcv_peak_extra_mib", "(c) MiB", ".0f"),
    harness.Column("unpatched_host_syncs", "(a) syncs"),
    harness.Column("paper_host_syncs", "(b) syncs"),
    harness.Column("ipcv_host_syncs", "(c) syncs"),
)


def markdown_report(payload: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    s = payload["settings"]
    ipcv = s["ipcv"]
    extra = [
        harness.Column(key.format(v), label.format(v), spec)
        for v in attention_variants(s["variants"])
        for key, label, spec in (
            ("{}_ms", "{} ms", ".1f"),
            ("speedup_{}", "{} speedup", ".2f"),
            ("efficiency_{}", "{} / bound", ".0%"),
        )
    ]
    columns = [c for c in (*MARKDOWN_COLUMNS, *extra) if any(row.get(c.key) is not None for row in rows)]
    spread = "\n".join(
        f"- `{row['case']}`: "
        + ", ".join(f"{v} p10-p90 {row[f'{v}_p10_ms']:.1f}-{row[f'{v}_p90_ms']:.1f} ms" for v in s["variants"])
        for row in rows
    )
    checks = "\n".join(
        f"- `{case['case']}`: {'passed' if case['checks']['passed'] else '**FAILED**'} ("
        + ", ".join(f"{k} {v:.2e}" for k, v in case["checks"].items() if k != "passed")
        + ")"
        for case in payload["cases"]
    )
    return f"""# Vision-tower benchmark: {s["model"]}, {s["dtype"]}

{harness.environment_markdown(payload["environment"])}

IPCV: ratio {ipcv["ratio"]}, prune layer {ipcv["prune_layer"]}, {ipcv["as_layers"]} stabilisation blocks, \
{ipcv["num_neighbors"]} neighbours, scope {ipcv["scope"]}. (a) unpatched, (b) the paper's formulation \
(full-length attention in the stabilisation blocks, `torch` planning), (c) `ipcv_kernels` \
(backends: {", ".join(f"{op} `{name}`" for op, name in s["ipcv_backends"].items())}). Times are medians of \
{s["repeats"]} interleaved rounds after {s["warmup"]} warm-up call(s); speedups are over (a); the bound is the FLOP \
model's (`ipcv_kernels.flops`); memory is the peak above the pre-call level ({s["memory_method"]}).

{harness.markdown_table(rows, columns)}

Spread:
{spread}

Checks before timing (relative errors; `bound` is the pass threshold):
{checks}

{breakdown_markdown(payload["cases"], s["variants"])}
Reproduce: `{s["command"]}`
"""


def _stage_order(stage: str) -> tuple[int, int]:
    """Pipeline order of ``block_breakdown`` stages; the planning block first among its kind."""
    kinds = ("embed", "full", "stabilised", "pruned")
    rank = next((i for i, kind in enumerate(kinds) if stage.startswith(kind)), len(kinds) + 1)
    if "restoration" in stage:
        rank = len(kinds)
    return rank, 0 if "planning" in stage else 1


def breakdown_markdown(cases: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """Per case, a stage x variant table of ms and achieved TFLOP/s (empty without breakdowns)."""
    parts = []
    for case in cases:
        if not all("breakdown" in case["variants"][v] for v in variants):
            continue
        stages: list[str] = []
        for v in variants:
            stages += [s for s in case["variants"][v]["breakdown"]["stages"] if s not in stages]
        stages.sort(key=_stage_order)
        rows = []
        for stage in stages:
            row: dict[str, Any] = {"stage": stage}
            for v in variants:
                entry = case["variants"][v]["breakdown"]["stages"].get(stage)
                if entry is not None:
                    row[v] = (
                        f"{entry['ms']:.1f} ms, {entry['gflop']:.3g} GFLOP, {entry['tflops_per_s'] or 0:.3g} TFLOP/s"
                    )
            rows.append(row)
        columns = [harness.Column("stage", "stage"), *(harness.Column(v, v) for v in variants)]
        parts.append(f"`{case['case']}` ({case['tokens']} tokens):\n\n" + harness.markdown_table(rows, columns))
    if not parts:
        return ""
    return "## Where the time goes (one untimed call per variant, stage by stage)\n\n" + "\n\n".join(parts) + "\n"


def plot(path: Path, cases: Sequence[dict[str, Any]], title: str) -> Path | None:
    """Speedup over (a) against tokens: single images as lines, batches and videos as markers."""
    measured = [c for c in cases if "speedup_ipcv" in c]
    if not measured:
        return None
    series = []
    styles = {"image": ("s-", "--", "o-", ":"), "batch": ("D", "d", "P", "p"), "video": ("^", "v", "X", "x")}
    for kind, (ipcv_style, bound_style, paper_style, paper_bound_style) in styles.items():
        group = sorted((c for c in measured if c["kind"] == kind), key=lambda c: c["tokens"])
        if not group:
            continue
        tokens = [c["tokens"] for c in group]
        series.append(
            harness.Series(f"(c) ipcv_kernels, {kind}", tokens, [c["speedup_ipcv"] for c in group], ipcv_style)
        )
        series.append(harness.Series(f"(c) FLOP bound, {kind}", tokens, [c["bound_ipcv"] for c in group], bound_style))
        if all("speedup_paper" in c for c in group):
            series.append(
                harness.Series(f"(b) paper, {kind}", tokens, [c["speedup_paper"] for c in group], paper_style)
            )
            series.append(
                harness.Series(f"(b) FLOP bound, {kind}", tokens, [c["bound_paper"] for c in group], paper_bound_style)
            )
    return harness.plot_series(
        path, series, xlabel="tokens per call", ylabel="speedup over unpatched", title=title, hline=1.0
    )


# -- command line ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_vit", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--suite", choices=sorted(SUITES), default=None, help="defaults for everything below")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="seeded random tower of this shape")
    source.add_argument("--model", type=Path, help="local Qwen2-VL checkpoint directory: load its vision tower")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--cases", nargs="+", help="HxW (image), HxW*B (batch), HxW@F (video), in pixels")
    p.add_argument("--ratio", type=float)
    p.add_argument("--prune-layer", type=int)
    p.add_argument("--as-layers", type=int)
    p.add_argument("--neighbors", type=int)
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help=f"of {', '.join(VARIANTS)}, and ipcv_<ngr_attention backend> (e.g. ipcv_torch_varlen)",
    )
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--check", choices=("first", "all", "none"), default="first", help="ratio-0 equivalence check")
    p.add_argument(
        "--on-check-failure",
        choices=("stop", "warn"),
        default="stop",
        help="warn: record the failed check and time the case anyway",
    )
    p.add_argument("--attn-implementation", default="sdpa", help="the tower's attention (sdpa, eager, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the result files")
    p.add_argument("--name", default=None, help="file stem (default vit_<suite>, or vit_<preset>_<device>)")
    p.add_argument(
        "--breakdown", action="store_true", help="also time every stage and count host syncs (extra calls per variant)"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge ``--suite`` defaults with explicit flags (flags win)."""
    suite = SUITES[args.suite or ("gpu" if (args.device or "").startswith("cuda") else "cpu")]
    ipcv = IPCVConfig(
        prune_layer=args.prune_layer if args.prune_layer is not None else suite.ipcv.prune_layer,
        ratio=args.ratio if args.ratio is not None else suite.ipcv.ratio,
        as_layers=args.as_layers if args.as_layers is not None else suite.ipcv.as_layers,
        num_neighbors=args.neighbors if args.neighbors is not None else suite.ipcv.num_neighbors,
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


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (parsed from ``argv``); write and return the payload."""
    harness.configure_threads(args.threads)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = settings_from_args(args)
    dtype = DTYPES[s["dtype"]]
    if s["from_checkpoint"]:
        tower = load_vision_tower(args.model, dtype=dtype, device=device, attn_implementation=args.attn_implementation)
    else:
        vision_config = vision_config_from_preset(s["model"], args.attn_implementation)
        tower = build_tower(vision_config, dtype=dtype, device=device, seed=args.seed)
    vision_config = tower.config
    ipcv: IPCVConfig = s["ipcv"]
    ipcv.check_depth(vision_config.depth)
    cases = [parse_case(text, vision_config) for text in s["cases"]]
    variants = [v for v in VARIANTS if v in args.variants]
    variants += [v for v in dict.fromkeys(args.variants) if v not in VARIANTS]
    configs = variant_configs(ipcv, variants)
    for variant in attention_variants(variants):
        backend = attention_variant_backend(variant)
        if backend not in available_backends("ngr_attention", device):
            raise ValueError(f"variant {variant}: ngr_attention backend {backend!r} is not available on {device}")
    bench = Bench(tower, vision_config, device, dtype, configs)

    stem = args.name or (f"vit_{args.suite}" if args.suite else f"vit_{Path(s['model']).name}_{device.type}")
    files = harness.ResultFiles(args.out, stem)
    results = []
    total = len(cases) * len(variants) * s["repeats"]
    with harness.Progress(total, "bench_vit", enabled=not args.no_progress) as bar:
        for index, case in enumerate(cases):
            bar.describe(f"{case.name} ({case.tokens} tokens)")
            check_ratio_zero = args.check == "all" or (args.check == "first" and index == 0)
            results.append(
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
    remove_ipcv(tower)

    env = {**harness.environment(device), "load_average_start": load_at_start}
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
            "memory_method": results[0]["variants"][variants[0]]["memory"]["method"] if results else None,
            "check": args.check,
            "seed": args.seed,
            "command": shlex.join(["python", "benchmarks/bench_vit.py", *argv]),
        },
        "cases": results,
    }
    rows = table_rows(results, variants)
    files.write_json(payload)
    files.write_csv(rows)
    files.write_markdown(markdown_report(payload, rows))
    if not args.no_plot:
        title = f"{s['model']} {s['dtype']} on {env['device_name']}: ratio {ipcv.ratio}, P={ipcv.prune_layer}, A={ipcv.as_layers}"
        try:
            written = plot(files.path(".png"), results, title)
        except ImportError as error:  # matplotlib is optional (the "bench" extra): keep the numbers
            print(f"no plot: {error}", file=sys.stderr)
            written = None
        if written is not None:
            files.written.append(written)
    payload["files"] = [str(p) for p in files.written]
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``benchmarks/bench_vit.py``, ``python -m ipcv_kernels bench``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    payload = run(parser().parse_args(argv), argv)
    print(markdown_report(payload, table_rows(payload["cases"], payload["settings"]["variants"])))
    print("wrote " + ", ".join(payload["files"]))
    return 0
