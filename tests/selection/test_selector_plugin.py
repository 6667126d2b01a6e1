"""A selector from another library, through the entry-point group ``ipcv_kernels.selectors``: the
test package ``tests/selector_plugin`` is pip-installed into a temporary directory, found by
``importlib.metadata`` once that directory is on the path, and used by name through
``apply_ipcv`` (equal to the float64 spec oracle with its scores). The vLLM side is in
``tests/vllm/test_vllm_selector_plugin.py``."""

from __future__ import annotations

import pytest
import torch
from oracles.towers import build_tower, internvl_tiles, ipcv_tower_oracle
from selector_plugin.installed import SELECTOR_NAME, install_plugin

import ipcv_kernels as ik
from ipcv_kernels import selectors
from ipcv_kernels.testing import assert_close

CONFIG = dict(prune_layer=2, ratio=0.6, as_layers=1, num_neighbors=3)


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """The installed plugin's directory on ``sys.path``, with a fresh registry that has not yet
    read the entry points (both restored afterwards)."""
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path)))
    monkeypatch.setattr(selectors, "_registry", dict(selectors.BUILTIN_SELECTORS))
    monkeypatch.setattr(selectors, "_entry_points_loaded", False)


def test_entry_point_selector_is_used_by_name(plugin_on_path):
    assert SELECTOR_NAME in ik.available_selectors()
    tower = build_tower("internvl", dtype=torch.float64)
    pixels = internvl_tiles(2, dtype=torch.float64)

    def l1(x_before, x_after):
        return (x_after - x_before).abs().sum(-1)

    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, lambda: tower(pixels), [34], pinned={0, 17}, score_fn=l1, **CONFIG)
        with ik.ipcv_applied(tower, ik.IPCVConfig(**CONFIG, selection=SELECTOR_NAME)):
            got = tower(pixels)
    assert_close(got.last_hidden_state, expected.output.last_hidden_state)
    import ipcv_selector_plugin

    assert ipcv_selector_plugin.calls == 1


def test_a_broken_entry_point_warns_and_leaves_the_others(plugin_on_path, tmp_path, monkeypatch):
    site = next(tmp_path.glob("site"))
    entry_points = next(site.glob("*.dist-info")) / "entry_points.txt"
    entry_points.write_text(entry_points.read_text() + "broken = ipcv_selector_plugin:no_such_function\n")
    with pytest.warns(UserWarning, match="selector entry point 'broken'"):
        names = ik.available_selectors()
    assert SELECTOR_NAME in names and "broken" not in names
