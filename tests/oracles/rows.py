"""Family-table rows as pytest parameters: a row whose transformers models the installed
transformers lacks (``Family.unavailable``: LLaVA-OneVision-1.5 before 5.2x) is skipped, saying why."""

from __future__ import annotations

import pytest

from ipcv_kernels.families import family


def row_params(ids) -> list:
    """``pytest.param(id)`` for each family id (or preset name, with its row's id given as
    ``(name, family_id)``), skipped where its row is unavailable."""
    params = []
    for entry in ids:
        name, family_id = entry if isinstance(entry, tuple) else (entry, entry)
        reason = family(family_id).unavailable()
        params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=reason) if reason else ()))
    return params
