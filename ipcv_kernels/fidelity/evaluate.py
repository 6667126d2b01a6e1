"""The measurement: every method and setting of a grid against the unpatched tower, per sample.

Compared output: the tower's per-token features before the merger, ``last_hidden_state``
(``[n, D]``; InternVL, CLIP, SigLIP ``[tiles or crops, L, D]``, read as ``[n, D]``). It is the
last tensor with one row per patch token, so every row is either a kept or a dropped token (the
merger mixes 2 x 2 tokens into one), and the merger / projector is the same function of it with
and without IPCV. Rows are in the tower's block order (Qwen2.5-VL: window order), the order of the
engine's kept positions (``IPCVPatch.last_keep``). Where ``last_hidden_state`` has fewer rows than
the last block's output (GLM-4.1V's is after its downsampling convolution), the last block's
output is compared instead: the same per-token features, before what merges them.

Methods, on the same samples:

- ``ipcv``: IPCV as configured (``P, r, A, k``).
- ``ngr_only``: no attention-stabilisation blocks (``A = 0``): NGR only at the final restoration.
- ``no_reconstruction``: the naive baseline, ``A = 0`` and ``IPCVConfig(reconstruct=False)``:
  dropped tokens keep their block-``P`` state until the end (no neighbours: ``num_neighbors``
  is ``None`` in its rows).

Each method runs with every token selector of the grid (``Grid.selections``,
``IPCVConfig.selection``: ``"diff"`` by default, ``"norm"``, ``"random"``, ``"uniform"`` or a
registered one), so selectors compare on the user's checkpoint and images; a row names its
``selection``.

Metrics, in float64, per sample (image or video): per-token cosine similarity
``<a, b> / sqrt(<a, a> <b, b>)`` between pruned ``b`` and unpruned ``a`` rows, averaged over all
tokens (``cosine_all``), the kept ones (``cosine_kept``) and the dropped ones
(``cosine_dropped``; ``None`` when none is dropped), and the relative L2 error
``||b - a||_F / ||a||_F``; each reported as the mean over samples and the worst sample. Equal
rows give cosine 1.0 exactly (``sqrt(s * s) == s`` in IEEE arithmetic). ``flop_ratio``: FLOPs
with IPCV over FLOPs without, summed over the samples (``Subject.flops``). ``wall_ms``: the
patched forwards of all samples (median of ``repeats`` per sample, summed).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..api import apply_ipcv, get_ipcv_patch, remove_ipcv
from ..bench import measure
from ..bench.progress import Progress
from ..config import IPCVConfig
from ..families import find_tower
from ..selectors import DEFAULT_SELECTION, available_selectors
from .subjects import FidelityError, Sample, Subject

METHODS = ("ipcv", "ngr_only", "no_reconstruction")


@dataclass(frozen=True)
class Grid:
    """The settings to sweep (each the values of one ``IPCVConfig`` field)."""

    ratios: tuple[float, ...]
    prune_layers: tuple[int, ...]
    as_layers: tuple[int, ...]
    neighbors: tuple[int, ...]
    selections: tuple[str, ...] = (DEFAULT_SELECTION,)  # token selectors (IPCVConfig.selection), by name


def default_grid(subject: Subject) -> Grid:
    """The family's recommended setting and a few around it, clamped to the tower's depth.

    Ratios 0 (the unpatched anchor) to 0.8 with the recommended one; prune layers ``P-1, P, P+1``
    within ``[1, depth)`` (``P`` itself clamped to ``depth - 1``); stabilisation depths ``A`` and
    ``ceil(A / 2)``; the recommended neighbour count ``k`` (it matters least; sweep it with
    ``--neighbors``).
    """
    recommended = IPCVConfig(**subject.family.recommended)
    depth = subject.depth
    prune = min(recommended.prune_layer, depth - 1)
    half = lambda value: -(-value // 2)  # noqa: E731  (ceil(value / 2) for ints)
    return Grid(
        ratios=tuple(sorted({0.0, 0.25, 0.5, recommended.ratio, 0.8})),
        prune_layers=tuple(p for p in (prune - 1, prune, prune + 1) if 1 <= p < depth),
        as_layers=tuple(sorted({half(recommended.as_layers), recommended.as_layers})),
        neighbors=(recommended.num_neighbors,),
    )


def method_configs(grid: Grid, depth: int, methods: Sequence[str] = METHODS) -> list[tuple[str, IPCVConfig]]:
    """``(method, config)`` of every grid point, without repeats, each selector in turn.

    ``A`` is clamped to ``depth - P`` (larger values mean "until the end", the same forward);
    ``ngr_only`` and ``no_reconstruction`` ignore the grid's ``A`` (and the latter ``k``).

    Raises:
        FidelityError: a prune layer outside ``[1, depth)``, an unknown method or selector.
    """
    for method in methods:
        if method not in METHODS:
            raise FidelityError(f"--methods: one of {', '.join(METHODS)}, got {method!r}")
    known = available_selectors()
    for selection in grid.selections:
        if selection not in known:
            raise FidelityError(f"--selections: one of {', '.join(known)}, got {selection!r}")
    for prune in grid.prune_layers:
        if not 1 <= prune < depth:
            raise FidelityError(f"--prune-layers: {prune} is outside [1, {depth - 1}] for this tower of depth {depth}")
    seen: set[tuple[str, IPCVConfig]] = set()
    configs = []
    points = itertools.product(grid.prune_layers, grid.ratios, grid.as_layers, grid.neighbors)
    for selection, method, (prune, ratio, as_layers, neighbors) in itertools.product(
        grid.selections, methods, list(points)
    ):
        if method == "ipcv":
            config = IPCVConfig(prune, ratio, min(as_layers, depth - prune), neighbors, selection=selection)
        elif method == "ngr_only":
            config = IPCVConfig(prune, ratio, 0, neighbors, selection=selection)
        else:  # the naive baseline has no neighbours: k = 1 is a placeholder
            config = IPCVConfig(prune, ratio, 0, 1, reconstruct=False, selection=selection)
        if (method, config) not in seen:
            seen.add((method, config))
            configs.append((method, config))
    return configs


# -- metrics ------------------------------------------------------------------------------------------
def token_cosine(reference: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity ``[n]`` (float64) of two ``[n, D]`` feature sets; 1.0 for equal rows."""
    a, b = reference.double(), actual.double()
    denominator = ((a * a).sum(-1) * (b * b).sum(-1)).sqrt()
    cosine = (a * b).sum(-1) / denominator
    # Two all-zero rows are equal: similarity 1; one zero row against another is undefined: 0.
    cosine = torch.where(denominator > 0, cosine, (a == b).all(-1).double())
    return cosine.clamp(-1.0, 1.0)


def relative_l2(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """``||actual - reference||_F / ||reference||_F`` in float64."""
    a = reference.double()
    return float((actual.double() - a).norm() / a.norm().clamp_min(1e-300))


@dataclass(frozen=True)
class SampleScore:
    """One sample's fidelity: cosine means over all / kept / dropped rows, relative L2 error."""

    cosine_all: float
    cosine_kept: float
    cosine_dropped: float | None
    rel_l2: float


def score(reference: torch.Tensor, actual: torch.Tensor, keep: torch.Tensor | None) -> SampleScore:
    """``SampleScore`` of ``actual`` vs ``reference`` (``[n, D]``), ``keep``: int64 kept rows
    (``None``: all rows kept)."""
    cosine = token_cosine(reference, actual)
    kept = torch.ones_like(cosine, dtype=torch.bool) if keep is None else torch.zeros_like(cosine, dtype=torch.bool)
    if keep is not None:
        kept[keep.to(kept.device)] = True
    dropped = cosine[~kept]
    return SampleScore(
        float(cosine.mean()),
        float(cosine[kept].mean()),
        float(dropped.mean()) if dropped.numel() else None,
        relative_l2(reference, actual),
    )


def patch_rows(keep: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The kept block rows ``keep`` of a tower that prepends a CLS row to every frame (its blocks'
    rows: ``[CLS, patches]`` per frame of ``grid_thw``), as rows of its output, which holds the
    patches alone (LLaVA-OneVision-1.5): the CLS rows left out, the others shifted."""
    frames = [int(h) * int(w) + 1 for t, h, w in grid_thw.tolist() for _ in range(int(t))]
    cls = torch.tensor([0, *frames[:-1]], dtype=torch.int64).cumsum(0).to(keep.device)
    patches = keep[~torch.isin(keep, cls)]
    return patches - torch.searchsorted(cls, patches, right=True)


def features(output: Any, last_block: torch.Tensor | None = None) -> torch.Tensor:
    """The compared output of a tower call: ``last_hidden_state`` as ``[n, D]`` rows, or
    ``last_block`` (the last block's output, any ``[..., D]``) as rows where it has more of them
    (a tower whose ``last_hidden_state`` already merges tokens)."""
    hidden = output.last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1])
    if last_block is not None:
        block_rows = last_block.reshape(-1, last_block.shape[-1])
        if block_rows.shape[0] > rows.shape[0]:
            return block_rows
    return rows


# -- the run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FidelityRow:
    """One method at one setting, over all samples (see the module docstring for each metric).

    tokens / kept_tokens: over all samples. ``*_mean``: mean over samples; ``*_worst``: the
    lowest cosine / highest error of any sample. pareto: no other row of the run has a lower or
    equal ``flop_ratio`` and a higher or equal ``cosine_all_mean``, one of them strictly.
    """

    method: str
    selection: str
    prune_layer: int
    ratio: float
    as_layers: int
    num_neighbors: int | None
    tokens: int
    kept_tokens: int
    cosine_all_mean: float
    cosine_all_worst: float
    cosine_kept_mean: float
    cosine_kept_worst: float
    cosine_dropped_mean: float | None
    cosine_dropped_worst: float | None
    rel_l2_mean: float
    rel_l2_worst: float
    flop_ratio: float
    wall_ms: float
    pareto: bool = False


@dataclass
class FidelityResult:
    """A whole run: what was measured (``settings``, ``samples``), where, and the rows."""

    settings: dict[str, Any]
    samples: list[dict[str, Any]]
    baseline_wall_ms: float
    rows: list[FidelityRow]
    environment: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """JSON-ready: environment, settings, samples, baseline wall time, rows."""
        return {
            "environment": self.environment,
            "settings": self.settings,
            "samples": self.samples,
            "baseline_wall_ms": self.baseline_wall_ms,
            "rows": [asdict(row) for row in self.rows],
        }


def mark_pareto(rows: Sequence[FidelityRow]) -> list[FidelityRow]:
    """``rows`` with ``pareto`` set: the run's front of low ``flop_ratio``, high ``cosine_all_mean``."""

    def dominated(row: FidelityRow) -> bool:
        return any(
            other.flop_ratio <= row.flop_ratio
            and other.cosine_all_mean >= row.cosine_all_mean
            and (other.flop_ratio < row.flop_ratio or other.cosine_all_mean > row.cosine_all_mean)
            for other in rows
        )

    return [FidelityRow(**{**asdict(row), "pareto": not dominated(row)}) for row in rows]


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float]:
    """``fn()``'s result and the median milliseconds of ``repeats`` calls (the first one returns)."""
    results: list[Any] = []
    times = [measure.time_once(lambda: results.append(fn()), device) for _ in range(repeats)]
    return results[0], measure.Timing(tuple(times)).median_ms


def evaluate_fidelity(
    subject: Subject,
    grid: Grid | None = None,
    *,
    methods: Sequence[str] = METHODS,
    repeats: int = 1,
    progress: bool = True,
) -> FidelityResult:
    """Run every method and grid setting on ``subject``'s samples and score them.

    Args:
        subject: the tower and samples (``load_subject``).
        grid: the settings; ``None``: ``default_grid(subject)``.
        methods: a subset of ``METHODS``.
        repeats: timed forwards per sample and setting (the median is kept).
        progress: a progress bar on stderr (tqdm).

    Returns:
        A ``FidelityResult`` (``environment`` left empty: ``run`` fills it after the run).

    Raises:
        FidelityError: bad grid values, methods or repeats (the message names the flag).
    """
    if repeats < 1:
        raise FidelityError(f"--repeats: must be >= 1, got {repeats}")
    grid = grid if grid is not None else default_grid(subject)
    configs = method_configs(grid, subject.depth, methods)
    tower, device = subject.tower, next(subject.tower.parameters()).device

    last_block = find_tower(tower)[1].blocks(tower)[-1]
    # A tower whose output merges or pools tokens (GLM's merger, Gemma 4's pooler, Llama 4's pixel
    # shuffle) is compared on its last block's rows, one per token (restored); one whose output
    # only leaves out the CLS rows its blocks carry (LLaVA-OneVision-1.5) on its output, the kept
    # rows mapped there (``patch_rows``).
    block_rows = not subject.family.kind.frame_cls

    def forward(sample: Sample) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            seen: list[torch.Tensor] = []

            def record(module: torch.nn.Module, args: tuple, output: Any) -> None:
                seen.append(output[0] if isinstance(output, tuple) else output)

            handle = last_block.register_forward_hook(record)
            try:
                with torch.inference_mode():
                    output = sample(tower)
            finally:
                handle.remove()
            return features(output, seen[-1] if seen and block_rows else None)

        return call

    remove_ipcv(tower)
    references, baseline_ms = [], 0.0
    for sample in subject.samples:
        reference, millis = _timed(forward(sample), device, repeats)
        references.append(reference)
        baseline_ms += millis
    unpatched_flops = sum(subject.flops(sample, None) for sample in subject.samples)

    rows = []
    started = time.perf_counter()
    with Progress(len(configs) * len(subject.samples), "fidelity", enabled=progress) as bar:
        for method, config in configs:
            bar.describe(f"{method}/{config.selection} P={config.prune_layer} r={config.ratio:g} A={config.as_layers}")
            apply_ipcv(tower, config)
            try:
                scores, wall_ms, kept = [], 0.0, 0
                for sample, reference in zip(subject.samples, references, strict=True):
                    actual, millis = _timed(forward(sample), device, repeats)
                    keep = get_ipcv_patch(tower).last_keep
                    if keep is not None and subject.family.kind.frame_cls:
                        keep = patch_rows(keep, sample.grid_thw)
                    scores.append(score(reference, actual, keep))
                    wall_ms += millis
                    kept += reference.shape[0] if keep is None else keep.numel()
                    bar.update()
            finally:
                remove_ipcv(tower)
            patched_flops = sum(subject.flops(sample, config) for sample in subject.samples)
            tokens = sum(r.shape[0] for r in references)
            rows.append(_row(method, config, scores, tokens, kept, patched_flops / unpatched_flops, wall_ms))
    settings = {
        "subject": subject.name,
        "family": subject.family.name,
        "depth": subject.depth,
        "dtype": str(next(tower.parameters()).dtype),
        "grid": asdict(grid),
        "methods": list(methods),
        "repeats": repeats,
        "compared_output": "last_hidden_state (per-token features before the merger)",
        "seconds": time.perf_counter() - started,
    }
    samples = [
        {
            "name": s.name,
            "kind": s.kind,
            "tokens": r.shape[0],
            "grid_thw": None if s.grid_thw is None else s.grid_thw.tolist()[0],
            "tiles": s.pixels.shape[0] if s.grid_thw is None else None,
        }
        for s, r in zip(subject.samples, references, strict=True)
    ]
    return FidelityResult(settings, samples, baseline_ms, mark_pareto(rows))


def _row(
    method: str,
    config: IPCVConfig,
    scores: list[SampleScore],
    tokens: int,
    kept: int,
    flop_ratio: float,
    wall_ms: float,
) -> FidelityRow:
    dropped = [s.cosine_dropped for s in scores if s.cosine_dropped is not None]
    return FidelityRow(
        method=method,
        selection=config.selection,
        prune_layer=config.prune_layer,
        ratio=config.ratio,
        as_layers=config.as_layers,
        num_neighbors=config.num_neighbors if config.reconstruct else None,
        tokens=tokens,
        kept_tokens=kept,
        cosine_all_mean=math.fsum(s.cosine_all for s in scores) / len(scores),
        cosine_all_worst=min(s.cosine_all for s in scores),
        cosine_kept_mean=math.fsum(s.cosine_kept for s in scores) / len(scores),
        cosine_kept_worst=min(s.cosine_kept for s in scores),
        cosine_dropped_mean=math.fsum(dropped) / len(dropped) if dropped else None,
        cosine_dropped_worst=min(dropped) if dropped else None,
        rel_l2_mean=math.fsum(s.rel_l2 for s in scores) / len(scores),
        rel_l2_worst=max(s.rel_l2 for s in scores),
        flop_ratio=flop_ratio,
        wall_ms=wall_ms,
    )
