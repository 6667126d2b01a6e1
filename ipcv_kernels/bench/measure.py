"""How the benchmarks measure: timing with its spread, speedups round by round and when they are
too noisy to quote, peak memory, host-device synchronisations.

Timing: ``warmup`` untimed calls, then ``repeats`` timed calls; reported as the median and the
spread (p10 / p90 and the interquartile range) of the samples. On CUDA each sample is a pair of
CUDA events around the call followed by ``torch.cuda.synchronize()`` (device time, no host
jitter); on CPU it is ``time.perf_counter`` around the call. ``time_interleaved`` rotates the
order of several variants every round so that drift (thermal, other processes) hits all alike,
and sample ``r`` of every variant comes from the same round ``r``: ``round_speedups`` pairs them,
so the spread of a speedup is measured, not guessed from the spreads of the two times.

Noise: ``noise_warnings`` says when a speedup is too noisy to trust: its per-round p10-p90 wider
than ``NOISY_SPEEDUP_SPREAD`` of its median, or the host's 1-minute load average above the cores
this process may use (other processes then compete for them).

Peak memory of one call (``measure_peak_memory``):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: bytes held by
  PyTorch's allocator, exact. ``peak_extra_bytes`` is the peak minus what was allocated before
  the call (activations and workspaces; the weights are excluded).
- CPU: ``tracemalloc`` does not see PyTorch's allocations, so we use the kernel's resident-set
  high-water mark: ``/proc/self/clear_refs`` (write ``5``) resets ``VmHWM`` in
  ``/proc/self/status`` (Linux >= 4.0), and ``VmHWM`` after the call minus ``VmRSS`` before it is
  the call's peak extra resident memory. It counts every allocation of the process (including
  other threads) at page granularity, and memory the allocator kept from earlier calls is reused
  without showing; treat it as an estimate. Where the reset is not possible the fields are
  ``None`` (reported honestly as unknown).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .environment import usable_cores

# A speedup whose per-round p10-p90 spans more than this fraction of its median (more than about
# +-10% around it) is too noisy to quote.
NOISY_SPEEDUP_SPREAD = 0.2


# -- timing ---------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (``0 <= q <= 1``) of ``values``, interpolated linearly between order
    statistics (numpy's default rule)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Timing:
    """Samples of one timed callable, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p10_ms(self) -> float:
        return percentile(self.samples_ms, 0.10)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 0.90)

    @property
    def iqr_ms(self) -> float:
        return percentile(self.samples_ms, 0.75) - percentile(self.samples_ms, 0.25)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: median, p10, p90, iqr, min, repeats, samples."""
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "iqr_ms": self.iqr_ms,
            "min_ms": self.min_ms,
            "repeats": len(self.samples_ms),
            "samples_ms": list(self.samples_ms),
        }


@dataclass(frozen=True)
class Spread:
    """Median and p10 / p90 of a few samples (per-round times or per-round speedups)."""

    p10: float
    median: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(percentile(values, 0.10), statistics.median(values), percentile(values, 0.90))

    @property
    def relative_width(self) -> float:
        """``(p90 - p10) / median``: how far apart the typical rounds are, relative to the median."""
        return (self.p90 - self.p10) / self.median


def round_speedups(base: Timing, other: Timing) -> tuple[float, ...]:
    """``base / other`` round by round: both must come from one ``time_interleaved`` call, whose
    sample ``r`` of every variant was taken in round ``r`` (under the same host load)."""
    if len(base.samples_ms) != len(other.samples_ms):
        raise ValueError(f"round_speedups: {len(base.samples_ms)} and {len(other.samples_ms)} rounds")
    return tuple(b / o for b, o in zip(base.samples_ms, other.samples_ms, strict=True))


def noise_warnings(speedups: dict[str, Spread], load_average: Sequence[float] | None) -> list[str]:
    """Why measured speedups are too noisy to trust (empty when nothing says so).

    Args:
        speedups: name -> the spread of its per-round speedups (``Spread.of(round_speedups(...))``).
        load_average: ``load_average()`` taken during or right after the timing.
    """
    warnings = [
        f"{name}: the per-round speedup's p10-p90 ({spread.p10:.2f}-{spread.p90:.2f}x) spans "
        f"{spread.relative_width:.0%} of its median, more than {NOISY_SPEEDUP_SPREAD:.0%}"
        for name, spread in speedups.items()
        if spread.relative_width > NOISY_SPEEDUP_SPREAD
    ]
    cores = usable_cores()
    if load_average is not None and load_average[0] > cores:
        warnings.append(
            f"the host's 1-minute load average ({load_average[0]:.1f}) exceeds the {cores} core(s) "
            "this process may use: other processes compete for them"
        )
    return warnings


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on CUDA, ``perf_counter`` elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` timed ones."""
    return time_interleaved({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 5,
    before_each: Callable[[str], None] | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time several variants in rounds: round ``r`` runs every variant once, starting at ``r``.

    Args:
        fns: name -> zero-argument callable.
        device: where the callables run (chooses the clock).
        warmup: untimed calls of every variant before the first round.
        repeats: timed rounds.
        before_each: called with the variant's name before each of its calls, outside the timed
            region (e.g. to switch a model's patch).
        progress: called after every timed call (e.g. a progress bar's ``update``).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            if before_each is not None:
                before_each(name)
            fns[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if before_each is not None:
                before_each(name)
            samples[name].append(time_once(fns[name], device))
            if progress is not None:
                progress()
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def time_modules(
    fn: Callable[[], Any], modules: dict[str, torch.nn.Module], device: torch.device
) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` once and return ``(its result, milliseconds spent inside each named module)``.

    Forward pre-hooks and hooks around every module: CUDA events on CUDA (read after one final
    synchronize, so the run is not serialised), ``perf_counter`` elsewhere. A module called several
    times accumulates. For a breakdown only: the hooks and events add a little overhead per module.
    """
    totals = dict.fromkeys(modules, 0.0)
    pending: list[tuple[str, Any, Any]] = []
    starts: dict[str, Any] = {}
    handles = []

    def before(name: str):
        def hook(module: torch.nn.Module, args: Any, kwargs: Any = None) -> None:
            if device.type == "cuda":
                starts[name] = torch.cuda.Event(enable_timing=True)
                starts[name].record()
            else:
                starts[name] = time.perf_counter()

        return hook

    def after(name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if device.type == "cuda":
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                pending.append((name, starts.pop(name), end))
            else:
                totals[name] += (time.perf_counter() - starts.pop(name)) * 1e3

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(before(name)))
        handles.append(module.register_forward_hook(after(name)))
    try:
        synchronize(device)
        result = fn()
        synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    for name, start, end in pending:
        totals[name] += start.elapsed_time(end)
    return result, totals


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """Run ``fn`` once and count the host-device synchronisations it caused (CUDA only).

    Uses ``torch.cuda.set_sync_debug_mode("warn")``: PyTorch warns at every synchronising call
    (a tensor value read on the host, ``nonzero``, data-sized outputs, blocking copies); each sync
    drains the launch queue and leaves the GPU idle while the host catches up. ``None`` elsewhere.
    """
    if device.type != "cuda":
        return fn(), None
    import warnings

    synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    synchronize(device)
    return result, sum("synchroniz" in str(w.message) for w in caught)


# -- memory ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of one call; ``None`` where it could not be measured. See the module docstring."""

    method: str
    peak_bytes: int | None
    peak_extra_bytes: int | None

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure_peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, PeakMemory]:
    """Run ``fn`` once and return ``(its result, PeakMemory)``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return result, PeakMemory("cuda_max_memory_allocated", peak, peak - before)
    if not _reset_rss_high_water():
        return fn(), PeakMemory("unavailable", None, None)
    before_kib = _proc_status_kib("VmRSS")
    result = fn()
    peak_kib = _proc_status_kib("VmHWM")
    if before_kib is None or peak_kib is None:
        return result, PeakMemory("unavailable", None, None)
    return result, PeakMemory("linux_rss_high_water", peak_kib * 1024, (peak_kib - before_kib) * 1024)
