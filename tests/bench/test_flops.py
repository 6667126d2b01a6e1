"""The FLOP model against hand-computed counts on small towers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ipcv_kernels.config import IPCVConfig
from ipcv_kernels.flops import (
    grid_seq_lens,
    predicted_speedup,
    qwen2_vl_flops,
    vit_flops,
)
from ipcv_kernels.reference.selection import keep_count

# depth 3, width D = 4, MLP M = 8, 2 heads. A full block on n rows, one segment:
# linear 2n(4D^2 + 2DM) = 2n * 128, attention 4D n^2 = 16 n^2.
TOWER = dict(depth=3, width=4, mlp_hidden=8, num_heads=2)


def test_unpatched_blocks_count_linear_and_per_segment_attention():
    report = vit_flops(**TOWER, seq_lens=[10])
    assert report.per_block == (2560 + 1600,) * 3
    assert report.total == 3 * 4160
    assert report.planning == report.restoration == report.overhead == 0
    # Two images of 5: same linear work, attention only within each image (16 * (25 + 25)).
    two = vit_flops(**TOWER, seq_lens=[5, 5])
    assert two.blocks[0].linear == 2560
    assert two.blocks[0].attention == 800


def test_ipcv_by_hand():
    config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2)
    report = vit_flops(**TOWER, seq_lens=[10], config=config)
    # kept = int(10 * 0.5) = 5, dropped = 5.
    full, stabilised, pruned = report.blocks
    assert (full.kind, stabilised.kind, pruned.kind) == ("full", "stabilised", "pruned")
    assert full.total == 4160
    # W_q, proj, MLP on 5 kept rows: 2 * 5 * (2*16 + 2*32) = 960; W_k, W_v on 10 rows: 2 * 10 * 32.
    assert stabilised.linear == 960 + 640
    assert stabilised.attention == 16 * 5 * 10
    # NGR: kept * D (h - base) + dropped * (k' + 2) * D = 20 + 5 * 4 * 4.
    assert stabilised.overhead == 100
    assert (pruned.linear, pruned.attention) == (2 * 5 * 128, 16 * 25)
    # Scores 3nD = 120, distance GEMM 2 * 5 * 5 * 4 = 200, squared norms 2 * 4 * 10 = 80.
    assert report.planning == 400
    assert report.restoration == 100
    assert report.total == 4160 + 2500 + 1680 + 400 + 100
    assert report.kept_tokens == 5
    assert predicted_speedup(vit_flops(**TOWER, seq_lens=[10]), report) == 12480 / 8840


def test_all_queries_formulation_costs_a_full_block_plus_reconstruction():
    config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2, as_queries="all")
    report = vit_flops(**TOWER, seq_lens=[10], config=config)
    assert report.blocks[1].kind == "stabilised_all"
    assert report.blocks[1].total == 4160 + 100
    # The keyword overrides the config's choice.
    kept = vit_flops(**TOWER, seq_lens=[10], config=config, as_queries="kept")
    assert kept.blocks[1].kind == "stabilised"
    assert kept.total < report.total


@pytest.mark.parametrize("as_queries", ["kept", "all"])
@pytest.mark.parametrize("seq_lens", [[10], [3, 7], [[4, 4, 4]]])
def test_ratio_zero_matmul_work_equals_unpatched_exactly(as_queries, seq_lens):
    config = IPCVConfig(prune_layer=1, ratio=0.0, as_layers=1, num_neighbors=2, as_queries=as_queries)
    unpatched = vit_flops(**TOWER, seq_lens=seq_lens)
    patched = vit_flops(**TOWER, seq_lens=seq_lens, config=config)
    assert patched.core == unpatched.core
    assert predicted_speedup(unpatched, patched, include_overhead=False) == 1.0
    # Only the selection scores (3nD) remain: nothing is dropped, so no search, no reconstruction.
    assert patched.overhead == 3 * sum(_flat(seq_lens)) * 4
    assert predicted_speedup(unpatched, patched) < 1.0


def _flat(seq_lens):
    return [n for item in seq_lens for n in ([item] if isinstance(item, int) else item)]


def test_video_spreads_kept_rows_over_frames():
    config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2)
    report = vit_flops(**TOWER, seq_lens=[[6, 6]], config=config)
    # One item of 12 rows, 6 kept: 3 per frame.
    assert report.blocks[1].attention == 16 * (3 * 6 + 3 * 6)
    assert report.blocks[2].attention == 16 * (9 + 9)


def test_scope_decides_which_rows_compete():
    image = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2)
    whole = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2, scope="global")
    assert vit_flops(**TOWER, seq_lens=[3, 7], config=image).kept_tokens == 1 + 3
    assert vit_flops(**TOWER, seq_lens=[3, 7], config=whole).kept_tokens == 5


def test_stabilisation_past_the_last_block_is_clamped():
    config = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=9, num_neighbors=2)
    kinds = [b.kind for b in vit_flops(**TOWER, seq_lens=[10], config=config).blocks]
    assert kinds == ["full", "full", "stabilised"]


def test_qwen2_vl_counts_embedding_and_merger():
    vision = SimpleNamespace(
        depth=3,
        embed_dim=4,
        mlp_ratio=2,
        num_heads=2,
        in_channels=3,
        temporal_patch_size=2,
        patch_size=2,
        hidden_size=6,
        spatial_merge_size=2,
    )
    report = qwen2_vl_flops(vision, [[1, 4, 4], [2, 2, 2]])
    assert grid_seq_lens([[1, 4, 4], [2, 2, 2]]) == [16, [4, 4]]
    tokens = 24
    assert report.embed == 2 * tokens * 24 * 4
    # 6 merged rows of 16 features: 16 -> 16 -> 6.
    assert report.merger == 2 * 6 * 16 * (16 + 6)
    assert report.blocks[0].attention == 16 * (256 + 16 + 16)


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match="num_heads"):
        vit_flops(3, 4, 8, 3, [10])
    with pytest.raises(TypeError, match="seq_lens"):
        vit_flops(3, 4, 8, 2, 10)
    with pytest.raises(ValueError, match="seq_lens"):
        vit_flops(3, 4, 8, 2, [0])
    with pytest.raises(ValueError, match="as_queries"):
        vit_flops(3, 4, 8, 2, [10], IPCVConfig(prune_layer=1), as_queries="some")
    with pytest.raises(ValueError, match="prune_layer"):
        vit_flops(3, 4, 8, 2, [10], IPCVConfig(prune_layer=3))
    with pytest.raises(TypeError, match="config"):
        vit_flops(3, 4, 8, 2, [10], {"ratio": 0.5})


# Kept queries on a video split over its frames as the data decide: images only for "kept".
COUNTER_CASES = [(case, q) for case in ("112x112", "56x112*2", "56x56@4") for q in (None, "all", "kept")]


@pytest.mark.parametrize(("case", "as_queries"), [c for c in COUNTER_CASES if c != ("56x56@4", "kept")])
def test_model_matches_torch_flop_counter_on_a_real_tower(case, as_queries):
    """Every matmul PyTorch runs (convolution, linear layers, eager attention) is what the model
    counts. ``ngr_attention`` is a custom op, opaque to the counter: its kept-query attention is
    the one term added back."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ipcv_kernels.api import apply_ipcv
    from ipcv_kernels.bench.calls import tower_calls
    from ipcv_kernels.bench.towers import build_tower, vision_config_from_preset
    from ipcv_kernels.bench.vit import Bench, parse_case

    vision = vision_config_from_preset("qwen2-vl-tiny", attn_implementation="eager")
    tower = build_tower(vision, dtype=torch.float32, device=torch.device("cpu"))
    config = None
    if as_queries is not None:
        config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=4, as_queries=as_queries)
        apply_ipcv(tower, config)
    bench = Bench(tower, tower_calls(tower), torch.device("cpu"), torch.float32, {})
    parsed = parse_case(case, vision)
    with FlopCounterMode(display=False) as counter:
        bench.forward(bench.inputs(parsed, 0))
    report = qwen2_vl_flops(vision, parsed.grid_thw, config)
    opaque = sum(b.attention for b in report.blocks if b.kind == "stabilised")
    assert counter.get_total_flops() + opaque == report.core


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.65, 0.778, 0.9, 0.99, 0.999])
def test_keep_count_is_the_rule_the_flop_model_stated(ratio):
    # The model's own former rule, max(1, int(n * (1 - r))), for every item size up to 20,000.
    assert all(keep_count(n, ratio) == max(1, int(n * (1 - ratio))) for n in range(1, 20_001))


def test_pinned_rows_are_kept_and_not_counted():
    # InternViT: every tile's CLS token is pinned; an image of 3 tiles of 1 + 16 rows keeps its 3 CLS
    # tokens and keep_count(48, r) patches, and only patches are embedded.
    from ipcv_kernels.flops import vit_flops
    from ipcv_kernels.reference import keep_count

    config = IPCVConfig(prune_layer=1, ratio=0.65, as_layers=1, num_neighbors=4)
    pinned = vit_flops(4, 64, 128, 4, [[17, 17, 17]], config, patch_dim=48, pinned_per_segment=1)
    assert pinned.kept_tokens == 3 + keep_count(48, 0.65)
    assert pinned.embed == 2.0 * 48 * 48 * 64
    assert vit_flops(4, 64, 128, 4, [[17, 17, 17]], None, patch_dim=48).embed == 2.0 * 51 * 48 * 64


def test_clip_vit_flops_pin_clip_cls_tokens_only():
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    from ipcv_kernels.flops import clip_vit_flops
    from ipcv_kernels.reference import keep_count

    config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=4)
    shapes = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, image_size=32, patch_size=8
    )
    clip = clip_vit_flops(CLIPVisionConfig(**shapes), [3, 1], config)  # 17 rows a crop: CLS + 16 patches
    assert (clip.tokens, clip.kept_tokens) == (4 * 17, 4 + keep_count(48, 0.5) + keep_count(16, 0.5))
    siglip = clip_vit_flops(SiglipVisionConfig(**shapes), [1, 1], config)
    assert (siglip.tokens, siglip.kept_tokens) == (32, 2 * keep_count(16, 0.5))


def test_padding_rows_are_pinned_queries_and_keys_only_before_the_prune_layer():
    # One segment of 10 rows, 2 of them padding: n = 8 free rows, 4 kept, plus the 2 padding rows.
    config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2)
    report = vit_flops(**TOWER, seq_lens=[10], config=config, padding=[2])
    full, stabilised, pruned = report.blocks
    assert report.kept_tokens == 4 + 2
    assert full.total == vit_flops(**TOWER, seq_lens=[10]).blocks[0].total  # dense attention under the mask
    # Stabilised: queries on the 6 kept rows, keys / values on the 8 rows that are not padding.
    assert (stabilised.query_rows, stabilised.key_rows) == (6, 8)
    assert stabilised.linear == 2 * 6 * (2 * 16 + 2 * 32) + 2 * 8 * 32
    assert stabilised.attention == 16 * 6 * 8
    # Pruned: 6 query rows over the 4 kept rows that are not padding.
    assert (pruned.query_rows, pruned.key_rows) == (6, 4)
    assert (pruned.linear, pruned.attention) == (2 * 6 * 96 + 2 * 4 * 32, 16 * 6 * 4)
    # The neighbour search sees the 8 free rows only: 4 dropped, 4 kept.
    assert report.planning == 3 * 10 * 4 + 2 * 4 * 4 * 4 + 2 * 4 * 8
    # Padding rows are patches: embedded like the others.
    assert vit_flops(**TOWER, seq_lens=[10], padding=[2], patch_dim=3).embed == 2 * 10 * 3 * 4
    everything = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2, as_queries="all")
    all_queries = vit_flops(**TOWER, seq_lens=[10], config=everything, padding=[2]).blocks[1]
    assert (all_queries.query_rows, all_queries.key_rows, all_queries.attention) == (10, 8, 16 * 10 * 8)
    with pytest.raises(ValueError, match="padding"):
        vit_flops(**TOWER, seq_lens=[10, 10], padding=[2])
    with pytest.raises(ValueError, match="padding"):
        vit_flops(**TOWER, seq_lens=[[5, 5]], padding=[[1]])


def test_read_blocks_count_the_blocks_up_to_the_last_one_read():
    config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=2)
    whole = vit_flops(**TOWER, seq_lens=[10], config=config)
    read = vit_flops(**TOWER, seq_lens=[10], config=config, read_blocks=[1])
    # LLaVA's -2 on a depth-3 tower: blocks 0 and 1 run, block 1 restores the full sequence.
    assert len(read.blocks) == 2 and read.blocks == whole.blocks[:2]
    assert (read.planning, read.restoration) == (whole.planning, whole.restoration)
    assert vit_flops(**TOWER, seq_lens=[10], read_blocks=[1]).total == 2 * 4160
    # Two read blocks from P on restore twice; a read layer before P leaves IPCV nothing to do.
    twice = vit_flops(**TOWER, seq_lens=[10], config=config, read_blocks=[1, 2])
    assert twice.restoration == 2 * whole.restoration and twice.blocks == whole.blocks
    early = vit_flops(**TOWER, seq_lens=[10], config=config, read_blocks=[0])
    assert early.total == 4160 and early.overhead == 0 and early.kept_tokens == 10
    with pytest.raises(ValueError, match="read_blocks"):
        vit_flops(**TOWER, seq_lens=[10], read_blocks=[3])
    with pytest.raises(TypeError, match="read_blocks"):
        vit_flops(**TOWER, seq_lens=[10], read_blocks=2)


def test_idefics3_flops_pin_padding_patches():
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    from ipcv_kernels.flops import idefics3_flops

    vision = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=4)
    # An image of 3 sub-images of 16 patches, the second with 4 padding patches; a second image alone.
    report = idefics3_flops(vision, [[0, 4, 0], [0]], config)
    assert (report.tokens, report.kept_tokens) == (64, 4 + keep_count(44, 0.5) + keep_count(16, 0.5))
    assert report == vit_flops(6, 64, 96, 4, [[16] * 3, 16], config, patch_dim=192, padding=[[0, 4, 0], 0])
    with pytest.raises(ValueError, match="padding_per_image"):
        idefics3_flops(vision, [[0], []], config)


# Tiny towers with eager attention, patched or not: (tower kind, ModelUse fields, case).
COUNTED_TOWERS = [
    ("idefics3", {}, "64x56"),  # 2 x 2 sub-images and the global one; the right column padded
    ("clip", {"feature_layer": -2}, "64x64*2"),  # LLaVA's read layer, two images of 4 tiles
    ("clip", {"feature_layer": -2, "grid_pinpoints": ((32, 64), (64, 32), (64, 64))}, "64x64"),  # anyres
]


@pytest.mark.parametrize(("kind", "use", "case"), COUNTED_TOWERS)
@pytest.mark.parametrize("as_queries", [None, "kept", "all"])
def test_tile_tower_models_match_torch_flop_counter(kind, use, case, as_queries):
    """As for the Qwen tower: every matmul PyTorch runs is what the model counts, plus
    ``ngr_attention`` (opaque to the counter: every block from ``P`` on runs it here)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ipcv_kernels.api import apply_ipcv
    from ipcv_kernels.bench.calls import tower_calls
    from ipcv_kernels.families import ModelUse, build_tower

    tower = build_tower(kind, attn="eager")
    calls = tower_calls(tower, ModelUse("test", **use) if use else None)
    parsed = calls.parse_case(case)
    config = None
    if as_queries is not None:
        config = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=2, num_neighbors=4, as_queries=as_queries)
        apply_ipcv(tower, config)
    inputs = calls.inputs(parsed, 0, torch.device("cpu"), torch.float32)
    with FlopCounterMode(display=False) as counter:
        calls.forward(inputs)
    report = calls.flops(parsed, config)
    opaque = sum(b.attention for b in report.blocks if b.kind != "full")
    assert counter.get_total_flops() + opaque == report.core
    if kind == "idefics3":
        assert sum(parsed.tile_padding) == 2 * 4  # the two right-hand sub-images: one column of 4 patches
    if "feature_layer" in use:
        assert len(report.blocks) == calls.depth - 1
