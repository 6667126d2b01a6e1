"""Plain text for command-line help, from docstrings written in reStructuredText.

The command lines (``python -m ipcv_kernels ...``, ``benchmarks/*.py``) take their descriptions
from module docstrings, whose markup (````literal````, ``:class:`name```, ``Example::``) would
otherwise reach the terminal as written.
"""

from __future__ import annotations

import re

# :role:`~module.Name` or :role:`text`; group 2 is the target without its `~` shortener.
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_INTERPRETED = re.compile(r"`([^`]+)`")


def _role_text(match: re.Match[str]) -> str:
    shortened, target = match.group(1), match.group(2)
    return target.rsplit(".", 1)[-1] if shortened else target


def plain_text(text: str) -> str:
    """``text`` without reStructuredText inline markup: literals and interpreted text lose their
    backticks, roles their ``:role:`` prefix (``~a.b.C`` becomes ``C``), and a paragraph-ending
    ``::`` (a literal block follows) becomes ``:``."""
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    return re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)


def help_summary(docstring: str | None) -> str:
    """The first paragraph of ``docstring``, on one line and in plain text: a command's description."""
    return plain_text(" ".join((docstring or "").split("\n\n")[0].split()))
