"""Result files of a benchmark run: ``<stem>.json``, ``.csv``, ``.md`` (tables) and ``.png`` (plots).

Result files go to ``--out``; the default is ``default_out(benchmark)``, ``./ipcv_results/<benchmark>``
under the current directory, so that an installed package never writes into a source checkout.
The committed results in ``benchmarks/results/`` are written only when named (``--out
benchmarks/results``). ``environment`` records the source revision when the package is imported
from a git checkout, and ``None`` otherwise.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Result files go under this directory of the current working directory unless --out names one.
RESULTS_DIR = Path("ipcv_results")


def default_out(benchmark: str) -> Path:
    """``./ipcv_results/<benchmark>``: relative, so it resolves against the current directory."""
    return RESULTS_DIR / benchmark


@dataclass(frozen=True)
class Column:
    """One column of the markdown table: ``key`` into a row, header text, format spec."""

    key: str
    header: str
    fmt: str = ""


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return format(value, fmt) if fmt else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c.key), c.fmt) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class ResultFiles:
    """Where one run's results go: ``<stem>.json``, ``<stem>.csv``, ``<stem>.md``, ``<stem>.png``."""

    directory: Path
    stem: str
    written: list[Path] = field(default_factory=list)

    def path(self, suffix: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{self.stem}{suffix}"

    def write_json(self, payload: dict[str, Any]) -> Path:
        path = self.path(".json")
        path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        self.written.append(path)
        return path

    def write_csv(self, rows: Sequence[dict[str, Any]]) -> Path:
        path = self.path(".csv")
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.written.append(path)
        return path

    def write_markdown(self, text: str) -> Path:
        path = self.path(".md")
        path.write_text(text.rstrip() + "\n")
        self.written.append(path)
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


@dataclass(frozen=True)
class Series:
    """One line of a plot. ``style``: a matplotlib format string (``"o-"``, ``"--"``)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "o-"


def plot_series(
    path: Path,
    series: Sequence[Series],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
    hline: float | None = None,
) -> Path:
    """A line plot written to ``path`` (PNG) with matplotlib's non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for line in series:
        axes.plot(line.x, line.y, line.style, label=line.label)
    if hline is not None:
        axes.axhline(hline, color="grey", linewidth=0.8)
    if logx:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
