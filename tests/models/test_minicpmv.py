"""MiniCPM-V 4.6 / 4.7 beyond the family table's checks (spec §5.12): the 2 x 2 merge inside the
tower after block ``insert_layer_id`` (IPCV from block ``insert_layer_id + 2`` on, smaller prune
layers refused), the ``"4x"`` mode without that merge, 4.7's tower under its own name, the FLOP
model and the hybrid decoder's refusal of LLM-side pruners."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from oracles.towers import ipcv_tower_oracle

import ipcv_kernels as ik
from ipcv_kernels import flops
from ipcv_kernels.families import build_model, family, find_family
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import MINICPMV_VISION, minicpmv_pixels

ROW = family("minicpmv")
# Slices of different sizes need transformers >= 5.19 (spec §5.14); equal ones run on 5.17 too.
MIXED = ROW.tower_test_skip()
SLICES = [(8, 8), (8, 12)] if MIXED is None else [(8, 8), (8, 8)]
INSERT = 2  # a tower whose merge follows block 2: IPCV from block 4 on


def tower_with_merge_after(insert: int, *, dtype: torch.dtype = torch.float32, name: str = "4_6") -> torch.nn.Module:
    """The tiny tower (``MINICPMV_VISION``, 7 blocks) with its merge after block ``insert``, seeded."""
    from transformers.models.minicpmv4_6 import modeling_minicpmv4_6

    module = modeling_minicpmv4_6
    if name == "4_7":
        from transformers.models.minicpmv4_7 import modeling_minicpmv4_7 as module
    vision = {**MINICPMV_VISION, "num_hidden_layers": 7, "insert_layer_id": insert}
    vision.pop("model_type")
    config = getattr(module, f"MiniCPMV{name}VisionConfig")(**vision)
    torch.manual_seed(0)
    tower = getattr(module, f"MiniCPMV{name}VisionModel")(config)
    with torch.no_grad():
        for parameter in tower.parameters():  # every parameter carries values (as jitter does)
            parameter.add_(0.02 * torch.randn_like(parameter))
    return tower.to(dtype).eval()


def call(tower: torch.nn.Module, sizes: list[tuple[int, int]], **kwargs):
    pixels, target_sizes = minicpmv_pixels(tower.config, sizes, dtype=tower.dtype)
    return lambda: tower(pixels, target_sizes=target_sizes, **kwargs).last_hidden_state


@pytest.mark.parametrize("prune_layer", [1, INSERT, INSERT + 1])
def test_prune_layers_at_or_before_the_merge_are_refused_before_patching(prune_layer):
    tower = tower_with_merge_after(INSERT)
    with pytest.raises(ValueError, match=r"prune_layer.*insert_layer_id"):
        ik.apply_ipcv(tower, ik.IPCVConfig(prune_layer=prune_layer, ratio=0.5, as_layers=1))
    assert ik.get_ipcv_patch(tower) is None
    with pytest.raises(ValueError, match="prune_layer"):
        flops.minicpmv_flops(tower.config, [(1, 8, 8)], ik.IPCVConfig(prune_layer=prune_layer))


def test_the_default_config_is_refused_and_the_recommended_one_taken():
    tower = tower_with_merge_after(6)  # the checkpoints' merge: IPCVConfig's P = 3 lies before it
    with pytest.raises(ValueError, match=r"prune_layer must be >= insert_layer_id \+ 2 = 8"):
        ik.apply_ipcv(tower, ik.IPCVConfig())
    assert ROW.recommended["prune_layer"] == 8


def test_blocks_after_the_merge_take_a_quarter_of_the_rows_and_every_token_is_restored():
    tower = tower_with_merge_after(INSERT)
    run = call(tower, SLICES)
    full = sum(h * w for h, w in SLICES)
    with torch.no_grad():
        expected = run()
        with ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=INSERT + 2, ratio=0.0, as_layers=1)):
            assert torch.equal(run(), expected)  # ratio 0 is the unpatched tower exactly
        with ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=INSERT + 2, ratio=0.5, as_layers=1)) as patched:
            got = run()
            tokens = ik.get_ipcv_patch(patched).last_tokens_per_block
    merged = [h * w // 4 for h, w in SLICES]
    kept = sum(max(1, int(n * 0.5)) for n in merged)
    assert tokens == [full] * (INSERT + 1) + [sum(merged)] + [kept] * 3
    assert got.shape == expected.shape == (1, sum(merged), tower.config.hidden_size)
    report = flops.minicpmv_flops(tower.config, [(1, h, w) for h, w in SLICES], ik.IPCVConfig(prune_layer=4, ratio=0.5))
    assert report.kept_tokens == kept and report.tokens == full
    assert [b.query_rows for b in report.blocks] == tokens


def test_tower_with_blocks_before_the_merge_matches_the_float64_oracle():
    """Blocks 0 .. insert_layer_id and the merge run on every patch; the oracle starts at block P - 1."""
    tower = tower_with_merge_after(INSERT, dtype=torch.float64)
    run = call(tower, SLICES)
    setting = dict(prune_layer=INSERT + 2, ratio=0.6, as_layers=1, num_neighbors=3)
    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, run, [h * w // 4 for h, w in SLICES], **setting)
        with ik.ipcv_applied(tower, ik.IPCVConfig(**setting)):
            got = run()
    assert_close(got, expected.output, dtype=torch.float32)


def test_4x_mode_without_the_merge_counts_every_patch_per_item():
    """``use_vit_merger=False`` (the model's ``"4x"``): every block takes every patch; the prune
    layer rule is the tower's, whatever the call."""
    tower = tower_with_merge_after(INSERT)
    run = call(tower, SLICES, use_vit_merger=False)
    full = [h * w for h, w in SLICES]
    with torch.no_grad():
        expected = run()
        with ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=INSERT + 2, ratio=0.0, as_layers=1)):
            assert torch.equal(run(), expected)
        with ik.ipcv_applied(tower, ik.IPCVConfig(prune_layer=INSERT + 2, ratio=0.5, as_layers=1)) as patched:
            got = run()
            tokens = ik.get_ipcv_patch(patched).last_tokens_per_block
    kept = sum(max(1, int(n * 0.5)) for n in full)
    assert tokens == [sum(full)] * (INSERT + 2) + [kept] * 3
    assert got.shape == expected.shape
    report = flops.minicpmv_flops(
        tower.config, [(1, h, w) for h, w in SLICES], ik.IPCVConfig(prune_layer=4, ratio=0.5), merged=False
    )
    assert report.kept_tokens == tokens[-1]


@pytest.mark.skipif(
    importlib.util.find_spec("transformers.models.minicpmv4_7") is None,
    reason="MiniCPM-V 4.7 needs transformers >= 5.19",
)
def test_4_7_tower_is_the_row_and_equals_4_6_with_the_same_weights():
    tower_4_6 = tower_with_merge_after(INSERT)
    tower_4_7 = tower_with_merge_after(INSERT, name="4_7")
    tower_4_7.load_state_dict(tower_4_6.state_dict())
    assert find_family(tower_4_7) == (ROW, tower_4_7)
    setting = ik.IPCVConfig(prune_layer=INSERT + 2, ratio=0.5, as_layers=1, num_neighbors=3)
    with torch.no_grad():
        with ik.ipcv_applied(tower_4_6, setting):
            expected = call(tower_4_6, SLICES)()
        with ik.ipcv_applied(tower_4_7, setting):
            got = call(tower_4_7, SLICES)()
    assert torch.equal(got, expected)


def test_llm_pruners_are_refused_on_the_hybrid_decoder():
    model = build_model("minicpmv")
    with pytest.raises(TypeError, match="llm_pruner"):
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2), llm_pruner=ik.FastV(layer=1, ratio=0.5))
    assert ik.get_ipcv_patch(model) is None
