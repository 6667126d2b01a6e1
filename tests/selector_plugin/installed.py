"""Install the test selector package (``tests/selector_plugin``) into a temporary directory, as pip
installs a library: its ``*.dist-info/entry_points.txt`` then declares the selector to
``importlib.metadata`` for whichever process has the directory on its path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent
SELECTOR_NAME = "plugin_l1"  # the entry point's name in pyproject.toml
LOGGED_SELECTOR_NAME = "plugin_logged"  # the default score, logging each call's rows


def install_plugin(directory: Path) -> Path:
    """``pip install --no-deps --target`` the package (offline: the environment's setuptools
    builds it); returns the directory to put on ``sys.path``. The source is copied first so that
    the build leaves nothing in the repository."""
    source = directory / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "ipcv_selector_plugin.py"):
        shutil.copy(SOURCE / name, source / name)
    site = directory / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*command, "--target", str(site), str(source)], check=True, capture_output=True)
    return site
