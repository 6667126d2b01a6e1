"""bench-vllm's result rows, markdown report and plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import environment, measure, results
from .cases import MEASURES, VARIANTS

MARKDOWN_COLUMNS = (
    results.Column("case", "case"),
    results.Column("tokens", "tokens"),
    results.Column("kept_tokens", "kept"),
    results.Column("encoder_unpatched_ms", "encoder ms, unpatched", ".1f"),
    results.Column("encoder_ipcv_ms", "encoder ms, IPCV", ".1f"),
    results.Column("encoder_speedup", "encoder speedup", ".2f"),
    results.Column("encoder_bound", "encoder FLOP bound", ".2f"),
    results.Column("encoder_efficiency", "encoder / bound", ".0%"),
    results.Column("encoder_speedup_min", "encoder speedup, fastest calls", ".2f"),
    results.Column("ttft_unpatched_ms", "TTFT ms, unpatched", ".1f"),
    results.Column("ttft_ipcv_ms", "TTFT ms, IPCV", ".1f"),
    results.Column("ttft_speedup", "TTFT speedup", ".2f"),
    results.Column("ttft_bound", "TTFT bound", ".2f"),
    results.Column("ttft_efficiency", "TTFT / bound", ".0%"),
    results.Column("ttft_speedup_min", "TTFT speedup, fastest calls", ".2f"),
)


def table_rows(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per case (the CSV and the markdown table)."""
    rows = []
    for case in cases:
        row: dict[str, Any] = {k: case.get(k) for k in ("case", "tokens", "kept_tokens")}
        for quantity in MEASURES:
            entry = case[quantity]
            for v in VARIANTS:
                row[f"{quantity}_{v}_ms"] = entry[v]["median_ms"]
                row[f"{quantity}_{v}_p10_ms"] = entry[v]["p10_ms"]
                row[f"{quantity}_{v}_p90_ms"] = entry[v]["p90_ms"]
            for key in ("speedup", "speedup_min", "speedup_p10", "speedup_p90", "bound", "efficiency"):
                row[f"{quantity}_{key}"] = entry[key]
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

{environment.environment_markdown(env)}

Model: a {s["family"]} model with the `{s["model"]}` vision tower and a tiny language model \
(`{s["language_model"]}`), seeded random weights, one in-process vLLM engine (eager, no prefix \
caching, no processor cache). IPCV ({s["ipcv_source"]}): ratio {ipcv["ratio"]}, prune layer \
{ipcv["prune_layer"]}, {ipcv["as_layers"]} stabilisation blocks, {ipcv["num_neighbors"]} neighbours, scope \
{ipcv["scope"]} (backends: {", ".join(f"{op} `{name}`" for op, name in s["ipcv_backends"].items())}), \
switched on and off between calls with `LLM.apply_model`. Encoder: `embed_multimodal` on a new \
random image every call, as vLLM's processor gives it; TTFT: `LLM.generate` of one request with a new random image and \
`max_tokens=1` (processing, encoder and prefill; vLLM's own `first_token_latency` is in the JSON \
and CSV). Times are medians of {s["repeats"]} interleaved rounds after {s["warmup"]} warm-up call(s) of \
each; the encoder's bound is the FLOP model's (`ipcv_kernels.flops`), the TTFT's that bound applied \
to the unpatched request's measured encoder share.

{results.markdown_table(rows, MARKDOWN_COLUMNS)}

Spread (p10-p90 of the per-round times and speedups; a speedup whose p10-p90 spans more than \
{measure.NOISY_SPEEDUP_SPREAD:.0%} of its median, or a host load average above the usable cores, is \
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
    for quantity in MEASURES:
        times = ", ".join(
            f"{v} {row[f'{quantity}_{v}_p10_ms']:.1f}-{row[f'{quantity}_{v}_p90_ms']:.1f} ms" for v in VARIANTS
        )
        parts.append(
            f"{quantity} {times}, speedup {row[f'{quantity}_speedup_p10']:.2f}-{row[f'{quantity}_speedup_p90']:.2f}x"
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
    for quantity, (measured_style, bound_style) in (("encoder", ("s-", "--")), ("ttft", ("o-", ":"))):
        label = "encoder" if quantity == "encoder" else "time to first token"
        series.append(
            results.Series(f"{label}, IPCV", tokens, [c[quantity]["speedup"] for c in ordered], measured_style)
        )
        series.append(results.Series(f"{label}, bound", tokens, [c[quantity]["bound"] for c in ordered], bound_style))
    return results.plot_series(
        path, series, xlabel="tokens per image", ylabel="speedup over unpatched", title=title, hline=1.0
    )
