"""Progress bars of the benchmarks and tools: tqdm where installed, silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


class Progress:
    """A tqdm bar when tqdm is installed and ``enabled``; otherwise silent. Use as a context."""

    def __init__(self, total: int, description: str, *, enabled: bool = True) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=description, leave=False, file=sys.stderr)

    def update(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def progress_iter(items: Iterable[Any], total: int, description: str, *, enabled: bool = True) -> Iterable[Any]:
    """Iterate ``items`` with a progress bar (see ``Progress``)."""
    with Progress(total, description, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()
