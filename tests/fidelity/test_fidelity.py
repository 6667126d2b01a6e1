"""``python -m ipcv_kernels fidelity``: exact at ratio 0, the three methods against the float64
spec oracles, the FLOP ratio against ``ipcv_kernels.flops``, every family's preset, checkpoints
and image folders, the video layout, and the command line end to end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from oracles.rows import row_params
from oracles.spec import ipcv_oracle
from oracles.towers import ipcv_tower_oracle
from PIL import Image

import ipcv_kernels as ik
from ipcv_kernels.__main__ import main as package_main
from ipcv_kernels.fidelity import PRESETS, Grid, evaluate_fidelity, load_subject, main
from ipcv_kernels.fidelity.evaluate import METHODS, features, method_configs, token_cosine
from ipcv_kernels.fidelity.subjects import qwen_video_patches, synthetic_image
from ipcv_kernels.flops import qwen2_vl_flops
from ipcv_kernels.reference import keep_count
from ipcv_kernels.testing import assert_close

SMALL = dict(image_size=16, num_images=1, video_frames=2)  # 64 tokens an image (preset patches: 2 px)
GRID = Grid(ratios=(0.0, 0.5), prune_layers=(2,), as_layers=(2,), neighbors=(3,))


@pytest.fixture(scope="module")
def qwen2_vl64():
    return load_subject(preset="qwen2-vl-tiny", dtype=torch.float64, **SMALL)


@pytest.mark.parametrize("preset", row_params((name, row.id) for name, row in PRESETS.items()))
def test_every_preset_runs_and_ratio_zero_is_exact(preset):
    subject = load_subject(preset=preset, **SMALL)
    result = evaluate_fidelity(subject, GRID, progress=False)
    assert {row.method for row in result.rows} == {"ipcv", "ngr_only", "no_reconstruction"}
    for row in result.rows:
        if row.ratio == 0:  # equal outputs: cosine 1.0 and error 0.0 exactly, nothing dropped
            assert (row.cosine_all_worst, row.cosine_kept_worst, row.rel_l2_worst) == (1.0, 1.0, 0.0)
            assert row.cosine_dropped_mean is None and row.kept_tokens == row.tokens
        else:
            assert row.cosine_all_mean < 1.0 and row.cosine_dropped_mean is not None
            assert row.kept_tokens < row.tokens and row.flop_ratio < 1.0
    kinds = [sample["kind"] for sample in result.samples]
    assert kinds == (["image", "video"] if subject.family.kind.videos else ["image"])


def test_token_cosine_is_one_for_equal_rows():
    rows = torch.randn(50, 7, dtype=torch.float64) * torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None]
    assert torch.equal(token_cosine(rows, rows.clone()), torch.ones(50, dtype=torch.float64))


def test_methods_match_float64_spec_oracle(qwen2_vl64):
    """Every method's output is the spec's (reconstruction off: neighbours of none), and the
    reported cosine is the one of the oracle's output."""
    grid = Grid(ratios=(0.5, 0.8), prune_layers=(2,), as_layers=(2,), neighbors=(3,))
    result = evaluate_fidelity(qwen2_vl64, grid, progress=False)
    tower = qwen2_vl64.tower
    configs = method_configs(grid, qwen2_vl64.depth)
    assert len(configs) == len(result.rows)
    for (method, config), row in zip(configs, result.rows, strict=True):
        cosines = []
        for sample in qwen2_vl64.samples:
            with torch.no_grad():
                reference = features(sample(tower))
                with ik.ipcv_applied(tower, config):
                    got = features(sample(tower))
                expected, _ = ipcv_oracle(
                    tower,
                    sample.pixels,
                    sample.grid_thw,
                    prune_layer=config.prune_layer,
                    ratio=config.ratio,
                    as_layers=config.as_layers,
                    num_neighbors=config.num_neighbors if config.reconstruct else 0,
                )
            assert_close(got, expected, dtype=torch.float32)
            cosines.append(float(token_cosine(reference, expected).mean()))
        assert row.method == method
        assert row.cosine_all_mean == pytest.approx(sum(cosines) / len(cosines), abs=1e-9)


def test_no_reconstruction_matches_tower_oracle_qwen2_5_vl():
    subject = load_subject(preset="qwen2.5-vl-tiny", dtype=torch.float64, **SMALL)
    config = ik.IPCVConfig(prune_layer=2, ratio=0.6, as_layers=1, num_neighbors=1, reconstruct=False)
    for sample in subject.samples:
        items = [int(sample.grid_thw.prod())]
        with torch.no_grad(), ik.ipcv_applied(subject.tower, config):
            got = features(sample(subject.tower))
        with torch.no_grad():
            expected = ipcv_tower_oracle(
                subject.tower,
                lambda s=sample: s(subject.tower),
                items,
                prune_layer=2,
                ratio=0.6,
                as_layers=1,
                num_neighbors=0,
            )
        assert_close(got, expected.output.last_hidden_state, dtype=torch.float32)


def test_flop_ratio_equals_flops_py(qwen2_vl64):
    result = evaluate_fidelity(qwen2_vl64, GRID, progress=False)
    configs = method_configs(GRID, qwen2_vl64.depth)
    vision = qwen2_vl64.tower.config
    grids = [sample.grid_thw.tolist() for sample in qwen2_vl64.samples]
    for (_, config), row in zip(configs, result.rows, strict=True):
        patched = sum(qwen2_vl_flops(vision, grid, config).total for grid in grids)
        assert row.flop_ratio == patched / sum(qwen2_vl_flops(vision, grid).total for grid in grids)


def test_internvl_flops_count_the_pinned_cls_tokens():
    """The FLOP model keeps exactly the rows the engine keeps (patch tokens plus every CLS)."""
    subject = load_subject(preset="internvl-tiny", image_size=40, num_images=1)
    result = evaluate_fidelity(subject, Grid((0.3, 0.65, 0.9), (2,), (1,), (2,)), methods=["ipcv"], progress=False)
    (sample,) = subject.samples
    tiles = sample.pixels.shape[0]
    for row in result.rows:
        assert row.kept_tokens == tiles + keep_count(tiles * 16, row.ratio)  # 16 patches a tile


def test_checkpoint_and_image_folder(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ipcv_kernels.testing.models import build_qwen2_vl_model

    build_qwen2_vl_model().save_pretrained(tmp_path / "ckpt")
    Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2).save_pretrained(tmp_path / "ckpt")
    images = tmp_path / "images"
    (images / "clip").mkdir(parents=True)
    synthetic_image(1, 24).save(images / "a.png")
    for i in range(3):  # a video of 3 frames: padded to 4 (temporal patches of 2)
        synthetic_image(i, 24).save(images / "clip" / f"{i}.png")
    subject = load_subject(model=tmp_path / "ckpt", images=images, image_size=16)
    assert subject.family.name == "Qwen2-VL"
    assert [(s.name, s.kind) for s in subject.samples] == [("a.png", "image"), ("clip", "video")]
    assert subject.samples[1].grid_thw.tolist() == [[2, 8, 8]]
    rows = evaluate_fidelity(subject, Grid((0.5,), (1,), (1,), (2,)), progress=False).rows
    assert len(rows) == 3 and all(0 < row.cosine_all_mean < 1 for row in rows)


def test_video_layout_is_the_processors():
    """Two equal frames are laid out as the processor lays out that image (repeated over time)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    size = {"shortest_edge": 16, "longest_edge": 1 << 20}  # no resize of a 16 x 16 image
    processor = Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2, size=size)
    image = Image.fromarray(np.asarray(synthetic_image(2, 16)))
    expected = processor(images=[image], return_tensors="pt")
    pixels, grid = qwen_video_patches([image, image], processor)
    assert grid.tolist() == expected["image_grid_thw"].tolist()
    torch.testing.assert_close(pixels, expected["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_cli_help_and_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_info:
        package_main(["fidelity", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--preset",
        "--model",
        "--images",
        "--ratios",
        "--prune-layers",
        "--as-layers",
        "--neighbors",
        "--out",
        "--no-progress",
        "(default: float32)",
    ):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["--ratios", "1.5"])
    assert "--ratios" in capsys.readouterr().err
    assert main(["--prune-layers", "6", "--no-progress", "--num-images", "1", "--video-frames", "0"]) == 2
    assert "--prune-layers: 6 is outside [1, 5]" in capsys.readouterr().err
    assert main(["--model", "/nonexistent", "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err


def test_cli_end_to_end(tmp_path, capsys):
    args = "--ratios 0 0.5 --prune-layers 2 --as-layers 1 --neighbors 2 --image-size 16 --num-images 1"
    assert main([*args.split(), "--video-frames", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fidelity.csv",
        "fidelity.json",
        "fidelity.md",
        "fidelity.png",
    ]
    payload = json.loads((tmp_path / "fidelity.json").read_text())
    assert {"environment", "settings", "samples", "rows"} <= set(payload)
    assert len(payload["rows"]) == 6 and payload["environment"]["torch"] == torch.__version__
    header = (tmp_path / "fidelity.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["method", "selection", "prune_layer", "ratio", "as_layers", "num_neighbors"]
    assert "cosine_dropped_worst" in header and "flop_ratio" in header and "wall_ms" in header
    assert "| method |" in (tmp_path / "fidelity.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_cli_without_matplotlib_keeps_the_numbers(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    args = "--ratios 0.5 --prune-layers 2 --as-layers 1 --neighbors 2 --image-size 16 --num-images 1"
    assert main([*args.split(), "--video-frames", "0", "--no-progress", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fidelity.csv", "fidelity.json", "fidelity.md"]
    assert len(json.loads((tmp_path / "fidelity.json").read_text())["rows"]) == 3
    captured = capsys.readouterr()
    assert "no plot:" in captured.err and "pip install 'ipcv_kernels[bench]'" in captured.err
    assert "fidelity.png" not in captured.out


def test_cli_compares_selectors(tmp_path, capsys):
    """``--selections``: every method with every selector, beside each other in the results; a
    selector changes which tokens are kept, never how many."""
    args = ["--preset", "qwen2-vl-tiny", "--ratios", "0.5", "--prune-layers", "2", "--as-layers", "1"]
    args += ["--num-images", "1", "--video-frames", "2", "--no-progress", "--out", str(tmp_path)]
    assert main([*args, "--selections", "diff", "norm", "random", "uniform"]) == 0
    rows = json.loads((tmp_path / "fidelity.json").read_text())["rows"]
    assert [(row["selection"], row["method"]) for row in rows] == [
        (selection, method) for selection in ("diff", "norm", "random", "uniform") for method in METHODS
    ]
    assert len({row["kept_tokens"] for row in rows}) == 1
    assert len({row["cosine_all_mean"] for row in rows if row["method"] == "ipcv"}) == 4
    assert "| selection |" in (tmp_path / "fidelity.md").read_text()
    capsys.readouterr()
    assert main([*args, "--selections", "no_such"]) == 2
    assert "--selections: one of" in capsys.readouterr().err
