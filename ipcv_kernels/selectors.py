"""Token selection as an extension point: named selectors that score the tokens at block ``P``.

A selector is a function ``fn(inputs: SelectionInputs) -> torch.Tensor`` returning one score per
packed row (higher is kept). ``IPCVConfig(selection=name)`` picks one by name, so a setting stays
a plain JSON-able value (vLLM's ``hf_overrides``, SGLang's override args, lmms-eval model args).
The engine does everything else, whatever the selector: pinned rows (a CLS token, padding) are
never dropped and do not count, item ``b`` keeps ``keep_count(n_b, ratio)`` of its unpinned rows
(the highest scores; ties either way), and neighbours are searched on ``x_P``. A selector cannot
change how many tokens are kept.

Built-ins (``docs/spec.md`` §3 step 2; references in ``ipcv_kernels.reference.selectors``):
``"diff"`` (the default, ``||x_P - x_{P-1}||``), ``"norm"`` (``||x_P||``), ``"random"`` (seeded
per item size) and ``"uniform"`` (coarse-to-fine lattice of each item's grid). An attention-based
selector is not built in: the CLS attention to the patches of block ``P-1`` would need that
block's attention probabilities, which no block returns without its ``n x n`` matrix.

Other libraries register theirs with ``register_selector(name, fn)``, or declare them in the
entry-point group ``ipcv_kernels.selectors`` (entry-point name = selector name, value = the
function), which every process loads the first time it resolves a selector name (vLLM and
SGLang workers included).
"""

from __future__ import annotations

import importlib.metadata
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import knn, select_tokens, shrink_cu_seqlens, token_scores
from .reference import IPCVPlan
from .reference.selectors import random_scores_reference, score_dtype

ENTRY_POINT_GROUP = "ipcv_kernels.selectors"
# The default: planned by the fused ``plan_ipcv`` op, which computes this score itself.
DEFAULT_SELECTION = "diff"


@dataclass(frozen=True)
class SelectionInputs:
    """What a selector receives, for the ``n`` packed rows of one tower call.

    x_before: ``[n, D]`` float, the input of block ``P-1`` (``x_{P-1}``).
    x_after: ``[n, D]`` same dtype, its output, the input of block ``P`` (``x_P``, the spec's
        ``base``).
    cu_items: int32 ``[B + 1]`` item offsets (one item for ``scope="global"``).
    pinned: int64 ``[Np]`` ascending rows the engine always keeps (CLS tokens, padding
        patches); their scores are ignored. Empty when the tower has none.
    grid: int64 ``[n, 3]`` ``(part, row, col)`` of every row: ``part`` is the call-wide index of
        the grid (image, video frame, tile, crop, sub-image) the row lies on, ``row`` / ``col`` its
        patch position there; ``-1`` in all three for rows on no grid (a CLS token). ``None``
        where the adapter does not know the grid.
    seed: ``IPCVConfig.selection_seed``, for selectors that draw random numbers.
    """

    x_before: torch.Tensor
    x_after: torch.Tensor
    cu_items: torch.Tensor
    pinned: torch.Tensor
    grid: torch.Tensor | None
    seed: int = 0


Selector = Callable[[SelectionInputs], torch.Tensor]


# -- the built-ins ----------------------------------------------------------------------------------
def diff_scores(inputs: SelectionInputs) -> torch.Tensor:
    """``"diff"``: ``||x_P[j] - x_{P-1}[j]||_2`` (``token_scores``)."""
    return token_scores(inputs.x_before, inputs.x_after, skip_check=True)


def norm_scores(inputs: SelectionInputs) -> torch.Tensor:
    """``"norm"``: ``||x_P[j]||_2``."""
    return torch.linalg.vector_norm(inputs.x_after, dim=-1, dtype=score_dtype(inputs.x_after))


def random_scores(inputs: SelectionInputs) -> torch.Tensor:
    """``"random"``: per item a seeded permutation of its rows (the reference: one CPU generator
    per item, so a batch scores each item as it would alone)."""
    scores = random_scores_reference(inputs.cu_items.cpu(), inputs.seed, score_dtype(inputs.x_after))
    return scores.to(inputs.x_after.device)


def uniform_scores(inputs: SelectionInputs) -> torch.Tensor:
    """``"uniform"``: the coarse-to-fine rank of every unpinned row within its item (see
    ``reference.selectors.uniform_scores_reference``), vectorised over the call."""
    if inputs.grid is None:
        raise ValueError("the 'uniform' selector needs each item's grid, which this tower's adapter does not give")
    grid = inputs.grid.to(inputs.x_after.device)
    n = grid.shape[0]
    part, row, col = grid.unbind(1)
    free = torch.ones(n, dtype=torch.bool, device=grid.device)
    free[inputs.pinned] = False
    if bool((free & (part < 0)).any()):
        raise ValueError("the 'uniform' selector needs a grid position of every unpinned row")
    on_grid = part >= 0
    parts = int(part.max()) + 1 if n and bool(on_grid.any()) else 0
    side = torch.ones(parts, dtype=torch.int64, device=grid.device)
    extent = torch.maximum(row, col)[on_grid] + 1
    side = side.scatter_reduce(0, part[on_grid], extent, reduce="amax")
    bits_of_part = torch.ceil(torch.log2(side.double())).to(torch.int64)
    bits = torch.where(on_grid, bits_of_part[part.clamp_min(0)], 0)
    key = torch.zeros(n, dtype=torch.int64, device=grid.device)
    for i in range(int(bits.max()) if n else 0):  # interleave bit i of row and col, least significant first
        pair = ((row >> i) & 1) * 2 + ((col >> i) & 1)
        key = torch.where(i < bits, key * 4 + pair, key)
    frac = key.double() / torch.pow(4.0, bits.double())
    frac = torch.where(free, frac, 2.0)  # pinned rows rank after every unpinned one
    item = torch.repeat_interleave(
        torch.arange(inputs.cu_items.numel() - 1, device=grid.device), inputs.cu_items.diff().to(torch.int64)
    )
    # Order by (item, frac, part, position): stable sorts from the last key to the first.
    order = torch.arange(n, device=grid.device)
    for values in (part, frac, item):
        order = order[torch.sort(values[order], stable=True).indices]
    rank = torch.empty(n, dtype=torch.int64, device=grid.device)
    rank[order] = torch.arange(n, device=grid.device) - inputs.cu_items.to(torch.int64)[item[order]]
    return (-rank).to(score_dtype(inputs.x_after))


BUILTIN_SELECTORS: dict[str, Selector] = {
    "diff": diff_scores,
    "norm": norm_scores,
    "random": random_scores,
    "uniform": uniform_scores,
}

_registry: dict[str, Selector] = dict(BUILTIN_SELECTORS)
_entry_points_loaded = False
_entry_points_loading = False
_lock = threading.Lock()  # the registry
_load_lock = threading.RLock()  # the entry points (re-entrant: a plugin may resolve names on import)


def register_selector(name: str, fn: Selector, *, replace: bool = False) -> None:
    """Make ``fn`` the selector ``name`` (``IPCVConfig(selection=name)``).

    Args:
        name: a non-empty str; a built-in name cannot be taken.
        fn: ``fn(inputs: SelectionInputs) -> torch.Tensor``: scores ``[n]`` (``n`` the packed
            rows), fp32 (or fp64 where the states are fp64), on the states' device, no NaN; higher
            is kept. Pinned rows' scores are ignored. It must not depend on anything but its
            inputs if a batch is to equal its items alone.
        replace: replace a selector registered under ``name`` by another function.

    Raises:
        TypeError: ``name`` not a str or ``fn`` not callable.
        ValueError: an empty name, a built-in name, or a name taken by another function
            (without ``replace``).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("name must be a non-empty str")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    with _lock:
        if name in BUILTIN_SELECTORS:
            raise ValueError(f"{name!r} is a built-in selector and cannot be replaced")
        current = _registry.get(name)
        if current is not None and current is not fn and not replace:
            raise ValueError(f"a selector {name!r} is already registered (pass replace=True to replace it)")
        _registry[name] = fn


def _load_entry_points() -> None:
    """Register every selector of the entry-point group, once per process (a broken one warns).

    Other threads wait until the loading is done; a plugin that resolves names while it is being
    imported (the same thread) sees the selectors loaded so far."""
    global _entry_points_loaded, _entry_points_loading
    if _entry_points_loaded:
        return
    with _load_lock:
        if _entry_points_loaded or _entry_points_loading:
            return
        _entry_points_loading = True
        try:
            for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    register_selector(entry.name, entry.load())
                except Exception as error:  # a broken plugin must not break the package
                    warnings.warn(
                        f"selector entry point {entry.name!r} ({entry.value}) not loaded: {error}", stacklevel=3
                    )
        finally:
            _entry_points_loading = False
            _entry_points_loaded = True


def available_selectors() -> list[str]:
    """The names of every registered selector (built-ins, registered ones, entry points)."""
    _load_entry_points()
    return sorted(_registry)


def get_selector(name: str) -> Selector:
    """The selector registered as ``name``; ``ValueError`` listing the known names otherwise."""
    _load_entry_points()
    fn = _registry.get(name)
    if fn is None:
        raise ValueError(f"selection must be one of {', '.join(sorted(_registry))}, got {name!r}")
    return fn


def compute_scores(name: str, fn: Selector, inputs: SelectionInputs) -> torch.Tensor:
    """``fn(inputs)``, checked: a selector that returns anything but scores ``[n]`` of the right
    dtype on the states' device, or NaNs, is refused (``TypeError`` / ``ValueError`` naming it).
    The NaN check reads one flag back to the host."""
    scores = fn(inputs)
    n, states = inputs.x_after.shape[0], inputs.x_after
    allowed = (torch.float32, torch.float64) if states.dtype == torch.float64 else (torch.float32,)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"selector {name!r} must return a torch.Tensor of scores, got {type(scores).__name__}")
    if scores.dtype not in allowed:
        raise TypeError(f"selector {name!r} must return {' or '.join(map(str, allowed))} scores, got {scores.dtype}")
    if tuple(scores.shape) != (n,):
        raise ValueError(f"selector {name!r} must return scores of shape ({n},), got {tuple(scores.shape)}")
    if scores.device != states.device:
        raise ValueError(f"selector {name!r} must return scores on {states.device}, got {scores.device}")
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"selector {name!r} returned NaN scores")
    return scores


def plan_from_scores(
    scores: torch.Tensor,
    base: torch.Tensor,
    cu_items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio: float,
    num_neighbors: int,
    *,
    backend: str = "auto",
) -> IPCVPlan:
    """``plan_ipcv`` with given scores: per-item selection, neighbours on ``base``, kept segments.

    Args:
        scores: float ``[n]``, higher is kept.
        base: ``[n, D]`` float, ``x_P``.
        cu_items: int32 ``[B + 1]``; cu_seqlens: int32 ``[S + 1]``; ratio, num_neighbors and
            backend as ``plan_ipcv``'s (inputs unchecked: the engine's own).
    """
    selection = select_tokens(scores, cu_items, ratio, backend=backend, skip_check=True)
    neighbors = knn(
        base[selection.drop],
        base[selection.keep],
        num_neighbors,
        selection.cu_drop,
        selection.cu_keep,
        backend=backend,
        skip_check=True,
    )
    kept_segments = shrink_cu_seqlens(cu_seqlens, selection.keep, skip_check=True)
    return IPCVPlan(*selection, neighbors, kept_segments)


def token_grid(parts: list[tuple[int, int, int]], cls: bool) -> torch.Tensor:
    """int64 ``[sum, 3]`` grid of sequences laid out row-major, each ``[CLS?, patches]``.

    ``parts``: ``(count, rows, cols)`` runs of equal sequences (tiles, crops, sub-images), each
    sequence its own part; ``cls``: every sequence starts with a CLS row (``-1`` coordinates).
    """
    pieces, first = [], 0
    for count, rows, cols in parts:
        row = torch.arange(rows).repeat_interleave(cols).repeat(count)
        col = torch.arange(cols).repeat(rows * count)
        part = torch.arange(first, first + count).repeat_interleave(rows * cols)
        cells = torch.stack([part, row, col], dim=1).view(count, rows * cols, 3)
        if cls:
            cells = torch.cat([torch.full((count, 1, 3), -1, dtype=torch.int64), cells], dim=1)
        pieces.append(cells.reshape(-1, 3))
        first += count
    return torch.cat(pieces) if pieces else torch.empty(0, 3, dtype=torch.int64)


def merge_unit_grid(grid_thw: list[list[int]], merge_size: int) -> torch.Tensor:
    """int64 ``[n, 3]`` grid of Qwen-VL packed rows: item ``(t, h, w)`` holds ``t`` frames (one
    part each) of ``h x w`` patches in merge-unit order (``m x m`` blocks row-major, each block
    row-major), as the Qwen processors pack them."""
    pieces, first = [], 0
    for t, h, w in grid_thw:
        m = merge_size
        row = torch.arange(h).view(h // m, 1, m, 1).expand(h // m, w // m, m, m).reshape(-1)
        col = torch.arange(w).view(1, w // m, 1, m).expand(h // m, w // m, m, m).reshape(-1)
        part = torch.arange(first, first + t).repeat_interleave(h * w)
        pieces.append(torch.stack([part, row.repeat(t), col.repeat(t)], dim=1))
        first += t
    return torch.cat(pieces) if pieces else torch.empty(0, 3, dtype=torch.int64)


__all__ = [
    "BUILTIN_SELECTORS",
    "DEFAULT_SELECTION",
    "ENTRY_POINT_GROUP",
    "SelectionInputs",
    "Selector",
    "available_selectors",
    "compute_scores",
    "get_selector",
    "merge_unit_grid",
    "plan_from_scores",
    "register_selector",
    "token_grid",
]
