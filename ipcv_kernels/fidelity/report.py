"""Result files of a fidelity run: ``<stem>.json``, ``.csv``, ``.md`` and ``.png`` (the benchmarks' formats;
the plot needs matplotlib, an optional dependency: without it the other files are still written)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..bench import environment, results
from .evaluate import METHODS, FidelityResult, FidelityRow

COLUMNS = (
    results.Column("method", "method"),
    results.Column("selection", "selection"),
    results.Column("prune_layer", "P"),
    results.Column("ratio", "r", ".2f"),
    results.Column("as_layers", "A"),
    results.Column("num_neighbors", "k"),
    results.Column("kept_tokens", "kept"),
    results.Column("cosine_all_mean", "cos all", ".4f"),
    results.Column("cosine_all_worst", "worst", ".4f"),
    results.Column("cosine_kept_mean", "cos kept", ".4f"),
    results.Column("cosine_dropped_mean", "cos dropped", ".4f"),
    results.Column("cosine_dropped_worst", "worst", ".4f"),
    results.Column("rel_l2_mean", "rel L2", ".4f"),
    results.Column("rel_l2_worst", "worst", ".4f"),
    results.Column("flop_ratio", "FLOP ratio", ".3f"),
    results.Column("wall_ms", "wall ms", ".1f"),
    results.Column("pareto_mark", "front"),
)
LINE_STYLES = ("-", "--", ":", "-.")  # one per selector of the run
STYLES = {"ipcv": ("tab:blue", "o"), "ngr_only": ("tab:orange", "s"), "no_reconstruction": ("tab:red", "^")}


def markdown(result: FidelityResult) -> str:
    """A heading, the environment, what was compared, and the table (Pareto rows starred)."""
    s = result.settings
    kinds = [sample["kind"] for sample in result.samples]
    rows = [{**asdict(row), "pareto_mark": "*" if row.pareto else ""} for row in result.rows]
    return "\n\n".join(
        [
            f"# IPCV fidelity: {s['subject']} ({s['family']}, depth {s['depth']}, {s['dtype']})",
            environment.environment_markdown(result.environment) if result.environment else "",
            f"{kinds.count('image')} image(s), {kinds.count('video')} video(s), "
            f"{sum(sample['tokens'] for sample in result.samples)} tokens; compared output: "
            f"{s['compared_output']}. Cosines: per token, averaged over the rows of each sample, then "
            "the mean and the worst sample; rel L2: ||pruned - unpruned|| / ||unpruned||. FLOP ratio: "
            "FLOPs with IPCV / without (`ipcv_kernels.flops`). Unpatched wall time "
            f"{result.baseline_wall_ms:.1f} ms. `*`: on the Pareto front (lowest FLOP ratio for its "
            "mean cosine over all rows).",
            results.markdown_table(rows, COLUMNS),
        ]
    )


def pareto_chain(rows: Sequence[FidelityRow]) -> list[FidelityRow]:
    """The rows not dominated within ``rows``, by increasing ``flop_ratio`` (one method's curve)."""
    front, best = [], -float("inf")
    for row in sorted(rows, key=lambda r: (r.flop_ratio, -r.cosine_all_mean)):
        if row.cosine_all_mean > best:
            front.append(row)
            best = row.cosine_all_mean
    return front


def plot(result: FidelityResult, path: Path) -> Path:
    """Mean cosine (all tokens) against FLOP ratio: every setting as a faint point, each method's
    (and selector's) best-fidelity-for-its-cost settings as a curve, the run's Pareto front
    circled in black."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    selections = list(dict.fromkeys(row.selection for row in result.rows))
    for (index, selection), method in itertools.product(enumerate(selections), METHODS):
        rows = [row for row in result.rows if row.method == method and row.selection == selection]
        if not rows:
            continue
        color, marker = STYLES[method]
        label = method if len(selections) == 1 else f"{method} ({selection})"
        axes.scatter(
            [r.flop_ratio for r in rows],
            [r.cosine_all_mean for r in rows],
            color=color,
            marker=marker,
            alpha=0.25,
            s=18,
        )
        chain = pareto_chain(rows)
        axes.plot(
            [r.flop_ratio for r in chain],
            [r.cosine_all_mean for r in chain],
            LINE_STYLES[index % len(LINE_STYLES)],
            color=color,
            marker=marker,
            label=label,
        )
    front = [row for row in result.rows if row.pareto]
    axes.scatter(
        [r.flop_ratio for r in front],
        [r.cosine_all_mean for r in front],
        s=110,
        facecolors="none",
        edgecolors="black",
        linewidths=1.2,
        label="Pareto front (all methods)",
    )
    s = result.settings
    axes.set_xlabel("FLOP ratio (with IPCV / without)")
    axes.set_ylabel("cosine similarity to the unpruned output\n(mean over tokens and samples)")
    axes.set_title(f"{s['subject']} ({s['family']}): fidelity of last_hidden_state vs compute", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_results(result: FidelityResult, directory: Path, stem: str = "fidelity") -> list[Path]:
    """Write ``<stem>.json`` (environment, settings, samples, rows), ``.csv``, ``.md`` and, where
    matplotlib is installed, ``.png`` (without it, stderr says so and how to get the plot); the
    paths written."""
    files = results.ResultFiles(directory, stem)
    files.write_json(result.payload())
    files.write_csv([asdict(row) for row in result.rows])
    files.write_markdown(markdown(result))
    png = files.path(".png")
    try:
        files.written.append(plot(result, png))
    except ImportError as error:  # matplotlib is optional (the "bench" extra): keep the numbers
        print(
            f"no plot: {error}. For {png.name}, install matplotlib (pip install 'ipcv_kernels[bench]') and run again.",
            file=sys.stderr,
        )
    return files.written
