"""The documentation runs as written, and no file of the repository points outside it.

Every fenced ``python`` block of README.md that needs no checkpoint runs, as written, in a fresh
interpreter; so does every ``python -m ipcv_kernels ...`` line of its ``bash`` blocks. Blocks that
need a checkpoint (they name a ``/path/to/...`` directory) are only parsed. The two set-up lines at
the top (install and the demo, then the test command) are run verbatim by ``.ci/run`` itself: the
tests here check that ``.ci/run`` extracts exactly those two lines and runs them, and what they do.
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

from ipcv_kernels.__main__ import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
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


def ci_setup_lines() -> dict[str, str]:
    """``{"README_INSTALL": line, "README_TESTS": line}``: README.md's set-up lines as ``.ci/run``
    extracts them, by running its own extraction commands on README.md."""
    lines = {}
    for name in ("README_INSTALL", "README_TESTS"):
        command = re.search(rf'^{name}="\$\((.*)\)"$', CI.read_text(), re.MULTILINE).group(1)
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, check=True)
        lines[name] = done.stdout.rstrip("\n")
    return lines


def test_readme_has_runnable_blocks():
    assert len(python_blocks()) >= 3
    assert all(language in ("python", "bash") for language, _ in readme_blocks())
    assert len(cli_lines()) >= 3


def test_ci_runs_the_readme_setup_block_verbatim():
    """The first block is exactly the two lines ``.ci/run`` extracts, and ``.ci/run`` runs both."""
    language, body = readme_blocks()[0]
    lines = ci_setup_lines()
    assert language == "bash" and body.splitlines() == [lines["README_INSTALL"], lines["README_TESTS"]]
    ci = CI.read_text()
    assert re.search(r'^eval "\$README_INSTALL"$', ci, re.MULTILINE)
    # The last test command CI starts (the vLLM tests, started before it, may still be running).
    assert re.search(r'^eval "\$README_TESTS"$', ci, re.MULTILINE)
    assert ci.rstrip().split("\n")[-1].startswith("wait_for ")


def test_readme_setup_line_installs_the_package_and_runs_the_demo():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch, package, demo = (shlex.split(part) for part in ci_setup_lines()["README_INSTALL"].split(" && "))
    assert torch[:2] == ["pip", "install"] and any(arg.startswith("torch==") for arg in torch)  # the CPU wheel first
    # The package, editable, built against that torch, with extras that exist.
    assert package[:2] == ["pip", "install"] and "--no-build-isolation" in package
    target = package[package.index("-e") + 1]
    extras = re.fullmatch(r"\.\[([\w,]+)\]", target).group(1).split(",")
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"])
    assert demo == ["python", "-m", "ipcv_kernels", "demo"]
    assert "demo" in SUBCOMMANDS  # CI runs it; tests/bench/test_cli.py checks what it prints


def test_readme_test_line_runs_this_suite_under_the_triton_interpreter():
    import tomllib

    args = shlex.split(ci_setup_lines()["README_TESTS"])
    assert args[0] == "TRITON_INTERPRET=1" and args[1:4] == ["python", "-m", "pytest"]
    paths = [arg for arg in args[4:] if not arg.startswith("-")]
    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert paths == testpaths == ["tests"]


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
