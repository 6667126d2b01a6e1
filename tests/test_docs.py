"""The documentation runs as written, and no file of the repository points outside it.

Every fenced ``python`` block of README.md that needs no checkpoint runs, as written, in a fresh
interpreter; so does every ``python -m ipcv_kernels ...`` line of its ``bash`` blocks. Blocks that
need a checkpoint (they name a ``/path/to/...`` directory) are only parsed. The two set-up lines at
the top (install, then the test command) are run verbatim by ``.ci/run`` itself.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
CHECKPOINT = "/path/to/"


def readme_blocks() -> list[tuple[str, str]]:
    return [(language, body) for language, body in FENCE.findall(README.read_text())]


def python_blocks() -> list[str]:
    return [body for language, body in readme_blocks() if language == "python"]


def cli_lines() -> list[str]:
    """``python -m ipcv_kernels ...`` commands of the bash blocks (continuation lines joined)."""
    lines = []
    for language, body in readme_blocks():
        if language == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if line.startswith("python -m ipcv_kernels") and CHECKPOINT not in line:
                    lines.append(line.split(" #")[0].strip())
    return lines


def run_isolated(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_readme_has_runnable_blocks():
    assert len(python_blocks()) >= 3
    assert all(language in ("python", "bash") for language, _ in readme_blocks())
    setup = readme_blocks()[0]
    assert setup[0] == "bash" and len(setup[1].splitlines()) == 2  # install + main job, then the tests


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path):
    block = python_blocks()[index]
    ast.parse(block)  # checkpoint blocks too: at least valid Python
    if CHECKPOINT in block:
        pytest.skip("needs a local checkpoint (parsed only)")
    result = run_isolated([sys.executable, "-c", block], tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("line", cli_lines())
def test_readme_cli_line_runs_as_written(line, tmp_path):
    args = shlex.split(line)
    result = run_isolated([sys.executable, *args[1:]], tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): every file
        return [path for path in ROOT.rglob("*") if path.is_file()]
    return [ROOT / name for name in listed.stdout.splitlines()]


def test_no_file_points_outside_the_repository():
    # The behavioural contract lives in docs/spec.md; a clone has nothing beside it.
    offenders = []
    for path in tracked_text_files():
        if path.suffix in (".png", ".so") or not path.exists() or path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="ignore")
        if "IPCV_SPEC" in text or "../shared" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    assert (ROOT / "docs" / "spec.md").is_file()
