"""What a benchmark run records about where it ran: device, library versions, host (CPU, usable
cores, load average), the source revision (when imported from a git checkout), and the thread and
dtype settings of the command lines.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# Dtype names accepted on the command lines of the demo and the vision-tower benchmark.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- metadata -------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the metadata says so instead of failing the run
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The host's 1 / 5 / 15 minute load averages (``None`` where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def source_checkout() -> Path | None:
    """The git work tree the package is imported from, or ``None`` (an installed package).

    The package directory must be the work tree's own ``ipcv_kernels/``: a package installed into
    a virtual environment that happens to sit inside some other repository (or inside this one)
    does not report that repository's commit.
    """
    package = Path(__file__).resolve().parents[1]
    top = _run_git(package, "rev-parse", "--show-toplevel")
    if top is None or (Path(top) / package.name).resolve() != package:
        return None
    return Path(top)


def _git(*args: str) -> str | None:
    checkout = source_checkout()
    return None if checkout is None else _run_git(checkout, *args)


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions, host and source revision of a run.

    ``git_commit`` / ``git_dirty`` are ``None`` when the package is not imported from a git
    checkout (see ``source_checkout``).
    """
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "argv": sys.argv,
        "usable_cores": usable_cores(),
        # Other processes sharing the host slow a CPU run down: the 1 / 5 / 15 minute load averages
        # when the metadata was taken (the end of a run) say how busy the host was.
        "load_average": load_average(),
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
    info["device_name"] = info["gpu"] or info["cpu"]
    return info


def configure_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when given (benchmarks on a shared box pin it)."""
    if threads is not None:
        torch.set_num_threads(threads)


def environment_markdown(env: dict[str, Any]) -> str:
    """Two lines naming the device and the versions, for the top of a result table."""
    dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
    load = f", host load average {env['load_average'][1]:.1f} (5 min)" if env.get("load_average") else ""
    return (
        f"Device: **{env['device_name']}** ({env['device']}, {env['torch_threads']} torch threads). "
        f"{env['date_utc']}, commit `{(env.get('git_commit') or 'unknown')[:10]}`{dirty}{load}.\n"
        f"python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}, CUDA {env['cuda']}."
    )
