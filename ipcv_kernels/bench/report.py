"""The vision-tower benchmark's report: the flat rows of its CSV, its markdown and its plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import environment, measure, results
from .variants import attention_variants


def _mib(value: int | None) -> float | None:
    """Bytes as MiB, ``None`` kept (memory that could not be measured)."""
    return None if value is None else value / 2**20


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
        for v in variants:
            if f"speedup_{v}_p10" in case:
                row[f"speedup_{v}_p10"] = case[f"speedup_{v}_p10"]
                row[f"speedup_{v}_p90"] = case[f"speedup_{v}_p90"]
        row["too_noisy"] = bool(case.get("noise_warnings"))
        row["check_ipcv_vs_paper"] = case["checks"].get(
            "ipcv_vs_paper", case["checks"].get("ipcv_vs_paper_informative")
        )
        row["check_ipcv_vs_paper_same_planning"] = case["checks"].get("ipcv_vs_paper_same_planning")
        row["check_ratio0"] = case["checks"].get("ratio0_vs_unpatched")
        row["checks_passed"] = case["checks"]["passed"]
        rows.append(row)
    return rows


MARKDOWN_COLUMNS = (
    results.Column("case", "case"),
    results.Column("tokens", "tokens"),
    results.Column("kept_tokens", "kept"),
    results.Column("unpatched_ms", "(a) ms", ".1f"),
    results.Column("paper_ms", "(b) ms", ".1f"),
    results.Column("ipcv_ms", "(c) ms", ".1f"),
    results.Column("speedup_paper", "(b) speedup", ".2f"),
    results.Column("speedup_ipcv", "(c) speedup", ".2f"),
    results.Column("bound_ipcv", "(c) FLOP bound", ".2f"),
    results.Column("efficiency_ipcv", "(c) / bound", ".0%"),
    results.Column("speedup_ipcv_min", "(c) speedup, fastest calls", ".2f"),
    results.Column("ipcv_over_paper", "(c) vs (b)", ".2f"),
    results.Column("unpatched_peak_extra_mib", "(a) MiB", ".0f"),
    results.Column("paper_peak_extra_mib", "(b) MiB", ".0f"),
    results.Column("ipcv_peak_extra_mib", "(c) MiB", ".0f"),
    results.Column("unpatched_host_syncs", "(a) syncs"),
    results.Column("paper_host_syncs", "(b) syncs"),
    results.Column("ipcv_host_syncs", "(c) syncs"),
)


def markdown_report(payload: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The run's ``.md``: environment, settings, the table of ``rows``, spread, checks, breakdown."""
    s = payload["settings"]
    ipcv = s["ipcv"]
    extra = [
        results.Column(key.format(v), label.format(v), spec)
        for v in attention_variants(s["variants"])
        for key, label, spec in (
            ("{}_ms", "{} ms", ".1f"),
            ("speedup_{}", "{} speedup", ".2f"),
            ("efficiency_{}", "{} / bound", ".0%"),
        )
    ]
    columns = [c for c in (*MARKDOWN_COLUMNS, *extra) if any(row.get(c.key) is not None for row in rows)]
    spread = "\n".join(spread_line(row, case, s["variants"]) for row, case in zip(rows, payload["cases"], strict=True))
    checks = "\n".join(
        f"- `{case['case']}`: {'passed' if case['checks']['passed'] else '**FAILED**'} ("
        + ", ".join(f"{k} {v:.2e}" for k, v in case["checks"].items() if k != "passed")
        + ")"
        for case in payload["cases"]
    )
    reads = f"\nAs the full model calls the tower: {s['reads']}.\n" if s.get("reads") else ""
    return f"""# Vision-tower benchmark: {s["model"]}, {s["dtype"]}

{environment.environment_markdown(payload["environment"])}

IPCV: ratio {ipcv["ratio"]}, prune layer {ipcv["prune_layer"]}, {ipcv["as_layers"]} stabilisation blocks, \
{ipcv["num_neighbors"]} neighbours, scope {ipcv["scope"]}. (a) unpatched, (b) the paper's formulation \
(full-length attention in the stabilisation blocks, `torch` planning), (c) `ipcv_kernels` \
(backends: {", ".join(f"{op} `{name}`" for op, name in s["ipcv_backends"].items())}). Times are medians of \
{s["repeats"]} interleaved rounds after {s["warmup"]} warm-up call(s); speedups are over (a); the bound is the FLOP \
model's (`ipcv_kernels.flops`); memory is the peak above the pre-call level ({s["memory_method"]}).
{reads}
{results.markdown_table(rows, columns)}

Spread (p10-p90 of the per-round times, and of the per-round speedups over (a); a speedup whose \
p10-p90 spans more than {measure.NOISY_SPEEDUP_SPREAD:.0%} of its median, or a host load average above the \
usable cores, is flagged as too noisy to trust):
{spread}

Checks before timing (relative errors; `bound` is the pass threshold):
{checks}

{breakdown_markdown(payload["cases"], s["variants"])}
Reproduce: `{s["command"]}`
"""


def spread_line(row: dict[str, Any], case: dict[str, Any], variants: Sequence[str]) -> str:
    """One case's line of the markdown's spread list, ending with its noise verdict."""
    times = ", ".join(f"{v} p10-p90 {row[f'{v}_p10_ms']:.1f}-{row[f'{v}_p90_ms']:.1f} ms" for v in variants)
    speedups = ", ".join(
        f"{v} {row[f'speedup_{v}_p10']:.2f}-{row[f'speedup_{v}_p90']:.2f}x"
        for v in variants
        if row.get(f"speedup_{v}_p10") is not None
    )
    line = f"- `{row['case']}`: {times}"
    if speedups:
        line += f"; speedup p10-p90 {speedups}"
    load = case.get("load_average")
    if load is not None:
        line += f"; load average {load[0]:.1f} (1 min)"
    warnings = case.get("noise_warnings")
    return line + (f". **Too noisy to trust**: {'; '.join(warnings)}." if warnings else "")


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
        columns = [results.Column("stage", "stage"), *(results.Column(v, v) for v in variants)]
        parts.append(f"`{case['case']}` ({case['tokens']} tokens):\n\n" + results.markdown_table(rows, columns))
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
            results.Series(f"(c) ipcv_kernels, {kind}", tokens, [c["speedup_ipcv"] for c in group], ipcv_style)
        )
        series.append(results.Series(f"(c) FLOP bound, {kind}", tokens, [c["bound_ipcv"] for c in group], bound_style))
        if all("speedup_paper" in c for c in group):
            series.append(
                results.Series(f"(b) paper, {kind}", tokens, [c["speedup_paper"] for c in group], paper_style)
            )
            series.append(
                results.Series(f"(b) FLOP bound, {kind}", tokens, [c["bound_paper"] for c in group], paper_bound_style)
            )
    return results.plot_series(
        path, series, xlabel="tokens per call", ylabel="speedup over unpatched", title=title, hline=1.0
    )
