"""The version floors ``pyproject.toml`` declares are the versions CI tests.

CI (``.ci/run``, which also runs README.md's set-up lines verbatim) pins the oldest version of each
dependency it tests (torch, transformers, Triton, lmms-eval) and tests the newest beside it; each
floor must equal that oldest pin, so that an install allowed by the floors is one CI has run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
ROOT = Path(__file__).resolve().parents[1]
# pytest is the test runner, installed at its newest by CI: its floor is not a tested version.
UNTESTED_FLOORS = {"pytest"}


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(text) for text in [*project["dependencies"], *(r for extra in extras for r in extra)]]


def ci_pins() -> dict[str, list[Version]]:
    """``{package: [pinned versions]}`` of every ``name==version`` that CI installs."""
    text = (ROOT / ".ci" / "run").read_text() + (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```")[
        0
    ]
    pins: dict[str, list[Version]] = {}
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([0-9][\w.]*)", text):
        pins.setdefault(name.lower(), []).append(Version(version))
    return pins


def floor(requirement: Requirement) -> Version | None:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    return max(bounds) if bounds else None


def test_every_floor_is_the_oldest_version_ci_tests():
    pins = ci_pins()
    assert {"torch", "transformers", "triton", "lmms-eval"} <= set(pins)
    checked = set()
    for requirement in declared_requirements():
        name = requirement.name.lower()
        if floor(requirement) is None or name in UNTESTED_FLOORS:
            continue
        assert name in pins, f"{requirement}: CI installs no pinned {name}, so its floor is untested"
        assert floor(requirement) == min(pins[name]), f"{requirement}: CI tests {name} {min(pins[name])} at the oldest"
        checked.add(name)
    assert checked == {"torch", "transformers", "triton", "lmms-eval"}


def test_setup_py_declares_no_requirements_of_its_own():
    # pyproject.toml is the one list of requirements; setup.py only builds the optional extension.
    setup = (ROOT / "setup.py").read_text()
    assert "install_requires" not in setup and "extras_require" not in setup and "python_requires" not in setup
