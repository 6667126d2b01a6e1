"""Every family of the table with an SGLang entry on the same checks (CPU, fp32, eager), on tiny
checkpoints saved with seeded random weights that SGLang and transformers both load, SGLang's
model built by its own loader with the plugin's hook (``--json-model-override-args``' ``ipcv``):

- the plugin patches the model when SGLang builds it, with the family's recommended setting for
  missing keys;
- ratio 0 equals the unpatched SGLang tower;
- with pruning, SGLang's tower output equals transformers' ``apply_ipcv`` on the same weights (one
  image, several of different sizes in one call, a video; ``scope="image"`` and ``"authors"``;
  with and without stabilisation blocks), and the tower's token counts show the pruning;
- images of different sizes in one call equal each image alone, and differ from planning them as
  one item;
- every attention call of SGLang's blocks gets metadata (``VisionAttentionMetadata``) that agrees
  with its ``cu_seqlens`` and its rows, pruned blocks included.

Plans are compared up to near-ties (``assert_plans_agree``), outputs on SGLang's plan, bounded as
every fast path is (``assert_close_to_reference``: SGLang's error against the float64 transformers
model at most ``TOLERANCE_FACTOR`` times transformers' own fp32 error, plus the fp32 floor).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

# A submodule: without SGLang, ``import sglang`` alone would find tests/sglang (a namespace package).
pytest.importorskip(
    "sglang.srt.models.qwen2_vl", reason="SGLang is not installed (tests/sglang run in their own environment)"
)

import ipcv_kernels as ik
import ipcv_kernels.sglang as iks
from ipcv_kernels.families import FAMILIES as TABLE
from ipcv_kernels.families import find_sglang_family
from ipcv_kernels.families.table import INTERNVL_RECOMMENDED
from ipcv_kernels.sglang.testing import encode_images
from ipcv_kernels.testing import (
    TOLERANCE_FACTOR,
    assert_close,
    assert_close_to_reference,
    assert_plans_agree,
    tolerance,
)
from ipcv_kernels.vllm.testing import INTERNVL_TILE, build_checkpoint, internvl_tiles, qwen_encoder_inputs

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
CONFIG = ik.IPCVConfig(**SETTINGS)
CALLS = ("one_image", "images_of_different_sizes", "video")
GRIDS = {
    "one_image": [[1, 8, 12]],
    "images_of_different_sizes": [[1, 8, 12], [1, 6, 4], [1, 2, 2], [1, 8, 8]],
    "video": [[2, 8, 8]],
}
INTERNVL_TILES = {"one_image": [3], "images_of_different_sizes": [3, 1, 5], "video": [4]}  # per item
TILE_ROWS = 1 + (INTERNVL_TILE // 4) ** 2  # CLS + 4 x 4 patches
_fresh = itertools.count(100)


@dataclass(frozen=True)
class Call:
    """One encoder call: the pixels (Qwen: patches ``[n, C * T * p * p]``; InternVL: tiles ``[tiles,
    3, H, W]``), the layout SGLang's call takes (``grid_thw`` rows, or tiles per image / frames per
    video), the items transformers gets, whether it is a video, and its token count."""

    pixels: torch.Tensor
    layout: Any
    items: Any
    video: bool
    tokens: int


@dataclass(frozen=True)
class Family:
    """One SGLang family under test: its row's name and recommended setting, transformers' class
    and checkpoint (the same weights), how to make a call and split it into its items, what of
    transformers equals SGLang's output (``reference(hf_model, call)``), and which blocks attend
    through SGLang's ``VisionAttention`` (``own_attention(depth, config)``)."""

    name: str
    hf_class: str
    reference_checkpoint: str
    make_call: Callable[[Any, str, int], Call]
    split: Callable[[Call], list[Call]]
    reference: Callable[[Any, Call], torch.Tensor]
    own_attention: Callable[[int, ik.IPCVConfig], list[int]]
    attention_path: str = "attn"
    recommended: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The calls whose unpatched SGLang output equals transformers' (see TRANSFORMERS_CASES).
    transformers_calls: tuple[str, ...] = CALLS


# -- Qwen ----------------------------------------------------------------------------------------
def qwen_call(model, name, seed):
    # SGLang's Qwen3.5 model keeps its text config as ``config`` (as its Qwen3-VL MoE does): the
    # patch sizes are its tower's patch embedding's.
    sizes = getattr(model.config, "vision_config", None) or model.visual.patch_embed
    kwargs, pixels = qwen_encoder_inputs(sizes, GRIDS[name], seed=seed)
    grid_thw = kwargs[f"{'video' if name == 'video' else 'image'}_grid_thw"]
    return Call(pixels, grid_thw, grid_thw, name == "video", int(grid_thw.prod(-1).sum()))


def qwen_split(call):
    lengths = call.layout.prod(-1).tolist()
    return [
        Call(pixels, grid, grid, call.video, int(grid.prod(-1).sum()))
        for pixels, grid in zip(call.pixels.split(lengths), call.layout.split(1), strict=True)
    ]


def qwen_merger(hf_model, call):
    return hf_model.model.visual(call.pixels.to(hf_model.dtype), grid_thw=call.layout).pooler_output


def qwen3_merger_and_taps(hf_model, call):
    """SGLang's Qwen3-VL tower output: the merger's and every DeepStack tap's, ``[n / 4, 4 * D]``."""
    output = hf_model.model.visual(call.pixels.to(hf_model.dtype), grid_thw=call.layout)
    return torch.cat([output.pooler_output, *output.deepstack_features], dim=1)


def glm4v_call(model, name, seed):
    """Qwen's calls, a video given as one grid row per frame: SGLang's GLM model calls its tower so
    (``get_video_feature``), as transformers' does (its tower takes no ``t > 1`` row)."""
    call = qwen_call(model, name, seed)
    frames = torch.tensor([[1, h, w] for t, h, w in call.layout.tolist() for _ in range(t)])
    return Call(call.pixels, frames, frames, call.video, call.tokens)


def glm4v_merger(hf_model, call):
    """transformers' GLM-4.1V features, a video's frames given to the tower as rows of their own
    (as ``get_video_features`` does; the bare tower takes no ``t > 1``)."""
    frames = torch.tensor([[1, h, w] for t, h, w in call.layout.tolist() for _ in range(t)])
    return hf_model.model.visual(call.pixels.to(hf_model.dtype), grid_thw=frames).pooler_output


def qwen_attention(depth, config):
    """SGLang's blocks run outside the stabilisation stretch (which runs ``ngr_attention``)."""
    return [i for i in range(depth) if not config.prune_layer <= i < config.stabilisation_end(depth)]


# -- InternVL ------------------------------------------------------------------------------------
def internvl_call(model, name, seed):
    counts = INTERNVL_TILES[name]
    tiles = internvl_tiles(sum(counts), seed=seed)
    # transformers: every video frame is its own run of image tokens, hence its own item.
    items = [1] * sum(counts) if name == "video" else counts
    return Call(tiles, counts, items, name == "video", sum(counts) * TILE_ROWS)


def internvl_split(call):
    return [
        Call(tiles, [count], [count], call.video, count * TILE_ROWS)
        for tiles, count in zip(call.pixels.split(call.layout), call.layout, strict=True)
    ]


def internvl_features(hf_model, call, layer=-1):
    """transformers' image features ``[tiles * 4, D]`` with ``call.items`` tiles per item, read at
    ``hidden_states[layer]``."""
    ik.set_tiles_per_image(hf_model, call.items)
    features = hf_model.model.get_image_features(
        pixel_values=call.pixels.to(hf_model.dtype),
        vision_feature_layer=layer,
        vision_feature_select_strategy="default",
    )
    return features.pooler_output.reshape(-1, features.pooler_output.shape[-1])


def internvl_attention(depth, config):
    """SGLang's layers run before ``P``; from ``P`` on the functional layer (``ngr_attention``)."""
    return list(range(config.prune_layer))


def qwen(name, prefix, reference=qwen_merger, **extra):
    return Family(
        name, f"{prefix}ForConditionalGeneration", None, qwen_call, qwen_split, reference, qwen_attention, **extra
    )


FAMILIES = {
    "qwen2_vl": qwen("Qwen2-VL", "Qwen2VL"),
    "qwen2_5_vl": qwen("Qwen2.5-VL", "Qwen2_5_VL", transformers_calls=("one_image", "images_of_different_sizes")),
    "qwen3_vl": qwen("Qwen3-VL", "Qwen3VL", qwen3_merger_and_taps),
    # Qwen3-VL's tower without DeepStack (SGLang builds its Qwen3-VL tower class).
    "qwen3_5": qwen("Qwen3.5", "Qwen3_5"),
    # A video's frames are items of their own, as transformers' GLM model calls its tower.
    "glm4v": dataclasses.replace(qwen("GLM-4.1V / 4.5V / 4.6V", "Glm4v", glm4v_merger), make_call=glm4v_call),
    # InternVL's own format; transformers runs the native checkpoint of the same weights.
    "internvl_chat": Family(
        "InternVL-Chat",
        "InternVLForConditionalGeneration",
        "internvl",
        internvl_call,
        internvl_split,
        internvl_features,
        internvl_attention,
        attention_path="attn.attn",
        recommended=INTERNVL_RECOMMENDED,
    ),
}


# SGLang 0.5.23's Qwen2.5-VL full-attention blocks attend over a whole video (one segment of
# ``t * h * w`` rows per ``grid_thw`` row), transformers' over each frame: unpatched, the two differ
# for videos (``test_qwen2_5_vl_videos_differ_from_transformers_unpatched``), so a Qwen2.5-VL video
# is compared with SGLang's own tower only (ratio 0, batching, metadata), never with transformers.
TRANSFORMERS_CASES = [(family_id, name) for family_id, family in FAMILIES.items() for name in family.transformers_calls]


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family_id(request):
    return request.param


@pytest.fixture(scope="module")
def model(family_id, sglang_process):
    """SGLang's model of the family, built by SGLang's loader with ``{"ipcv": SETTINGS}``."""
    return sglang_process(family_id, {"ipcv": SETTINGS})


@pytest.fixture(scope="module")
def hf_models(family_id, checkpoint, tmp_path_factory):
    """transformers' model of the same weights, fp32 and fp64."""
    import transformers

    family = FAMILIES[family_id]
    if family.reference_checkpoint is None:
        path = checkpoint(family_id)
    else:
        path = build_checkpoint(tmp_path_factory.mktemp(family.reference_checkpoint), family.reference_checkpoint)
    model = getattr(transformers, family.hf_class).from_pretrained(path, dtype=torch.float32).eval()
    return model, copy.deepcopy(model).to(torch.float64)


def blocks_of(model):
    patch = ik.get_ipcv_patch(model)
    return patch.blocks


def record_plans(patch, pinned=None):
    """From now on ``patch``'s adapter keeps ``(x_before, x_after, plan)`` of its latest forward as
    ``recorded``; with ``pinned`` it returns that plan instead of planning."""
    adapter, plan_of = patch.adapter, patch.adapter.plan

    def plan(x_before, x_after, *args, **kwargs):
        result = plan_of(x_before, x_after, *args, **kwargs) if pinned is None else pinned
        adapter.recorded = (x_before, x_after, result)
        return result

    adapter.plan = plan


def encode(model, call, config, pinned=None):
    """``(SGLang's vision features, tokens per block, plan)`` of ``call`` under ``config``
    (``None``: unpatched); the plugin's setting is back afterwards."""
    patch = None
    if config is None:
        iks.remove_ipcv(model)
    else:
        patch = iks.apply_ipcv(model, config)
        record_plans(patch, pinned)
    try:
        with torch.no_grad():
            output = encode_images(model, call.pixels, call.layout, video=call.video)
    finally:
        iks.apply_ipcv(model, CONFIG)
    if patch is None:
        return output, None, None
    return output, patch.last_tokens_per_block, patch.adapter.recorded[2]


def without_empty_segments(plan):
    """``plan`` with its kept segment offsets free of empty segments: SGLang's Qwen2.5-VL tower
    starts its full-attention offsets with one (``[0, 0, n_1, ...]``), transformers' does not (the
    tests plan at a full-attention block, where transformers' offsets have no empty segment)."""
    return plan._replace(cu_seqlens_kept=torch.unique_consecutive(plan.cu_seqlens_kept))


def transformers_run(family, hf_model, config, call, pinned=None):
    """``(family.reference output, (x_before, x_after, plan))`` of transformers under ``config``."""
    with torch.no_grad(), ik.ipcv_applied(hf_model, config):
        patch = ik.get_ipcv_patch(hf_model)
        record_plans(patch, pinned)
        output = family.reference(hf_model, call)
        return output, patch.adapter.recorded


def test_every_sglang_row_of_the_family_table_is_tested_here():
    rows = {row.id: row for row in TABLE if row.sglang is not None}
    assert set(FAMILIES) == set(rows)
    for family_id, family in FAMILIES.items():
        assert (family.name, family.recommended) == (rows[family_id].name, rows[family_id].recommended)
        assert rows[family_id].sglang.adapter_class().__name__ == rows[family_id].sglang.adapter.rpartition(":")[2]


def test_plugin_patches_the_model_when_built(model, family_id):
    assert ik.get_ipcv_patch(model).config == CONFIG
    assert find_sglang_family(model)[0].name == FAMILIES[family_id].name
    assert type(model).__module__.startswith("sglang.srt.models.")


def test_missing_keys_take_the_recommended_setting(family_id, sglang_process):
    given = {"prune_layer": 2, "as_layers": 1}  # the tiny towers are shallower than InternVL's P = 7
    model = sglang_process(family_id, {"ipcv": given})
    expected = ik.IPCVConfig(**{**FAMILIES[family_id].recommended, **given})
    assert ik.get_ipcv_patch(model).config == expected == ik.recommended_config(model, **given)


@pytest.mark.parametrize("name", CALLS)
def test_ratio_zero_equals_unpatched(model, family_id, name):
    call = FAMILIES[family_id].make_call(model, name, next(_fresh))
    expected, _, _ = encode(model, call, None)
    got, tokens, _ = encode(model, call, ik.IPCVConfig(**{**SETTINGS, "ratio": 0.0}))
    assert_close(got, expected)
    assert set(tokens) == {call.tokens}


@pytest.mark.parametrize("scope", ["image", "authors"])
@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize(("family_id", "name"), TRANSFORMERS_CASES, indirect=["family_id"])
def test_tower_equals_transformers(model, family_id, hf_models, name, as_layers, scope):
    """SGLang's plan equals the float64 transformers model's up to near-ties, and on that plan
    SGLang's vision features equal transformers'."""
    family = FAMILIES[family_id]
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers, "scope": scope})
    call = family.make_call(model, name, next(_fresh))
    got, tokens, plan = encode(model, call, config)
    hf32, hf64 = hf_models
    _, (x_before64, x_after64, plan64) = transformers_run(family, hf64, config, call)
    plan = without_empty_segments(plan)
    assert_plans_agree(plan, without_empty_segments(plan64), x_before64, x_after64)
    expected32, _ = transformers_run(family, hf32, config, call, pinned=plan)
    expected64, _ = transformers_run(family, hf64, config, call, pinned=plan)
    assert got.shape == expected64.shape
    assert_close_to_reference(got, expected64, expected32)
    assert tokens[: config.prune_layer] == [call.tokens] * config.prune_layer
    assert all(count < call.tokens for count in tokens[config.prune_layer :])


@pytest.mark.parametrize("family_id", ["qwen2_5_vl"], indirect=True)
def test_qwen2_5_vl_videos_differ_from_transformers_unpatched(model, family_id, hf_models):
    """Why Qwen2.5-VL videos are not compared with transformers (``TRANSFORMERS_CASES``): SGLang's
    tower differs from transformers' there before any patch (its full-attention segments span the
    frames). Should a later SGLang agree, this fails and the case joins ``TRANSFORMERS_CASES``."""
    family = FAMILIES[family_id]
    video = family.make_call(model, "video", next(_fresh))
    sglang_output, _, _ = encode(model, video, None)
    expected = family.reference(hf_models[0], video)
    assert (sglang_output - expected).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol
    image = family.make_call(model, "one_image", next(_fresh))
    assert_close(encode(model, image, None)[0], family.reference(hf_models[0], image))


def test_images_of_different_sizes_equal_each_alone(model, family_id):
    family = FAMILIES[family_id]
    call = family.make_call(model, "images_of_different_sizes", next(_fresh))
    together, _, plan = encode(model, call, CONFIG)
    alone, kept_alone, offsets = [], [], [0]
    for one in family.split(call):
        output, _, plan_one = encode(model, one, CONFIG)
        alone.append(output)
        kept_alone.append(plan_one.keep + offsets[-1])
        offsets.append(offsets[-1] + one.tokens)
    # The same tokens are kept per image (offsets shifted), and the outputs agree.
    assert torch.equal(plan.keep, torch.cat(kept_alone))
    assert_close(together, torch.cat(alone))


def test_each_image_is_its_own_item(model, family_id, hf_models):
    """The images of one call planned as one item (``scope="global"``) give other outputs than
    SGLang's, which equal transformers' per image (above): SGLang's call carries the images."""
    family = FAMILIES[family_id]
    call = family.make_call(model, "images_of_different_sizes", next(_fresh))
    got, _, _ = encode(model, call, CONFIG)
    as_one_item, _ = transformers_run(family, hf_models[0], dataclasses.replace(CONFIG, scope="global"), call)
    assert (got - as_one_item).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol


@pytest.mark.parametrize("family_id", ["internvl_chat"], indirect=True)
def test_internvl_reads_its_select_layer(model, family_id, hf_models):
    """``select_layer=-2``: SGLang's ``extract_feature`` reads ``hidden_states[-2]``, which the
    patch restores at the block before the last (the last one runs for nothing, and is skipped)."""
    family = dataclasses.replace(FAMILIES[family_id], reference=functools.partial(internvl_features, layer=-2))
    call = family.make_call(model, "images_of_different_sizes", next(_fresh))
    model.select_layer = -2
    try:
        got, tokens, plan = encode(model, call, CONFIG)
    finally:
        model.select_layer = -1
    expected32, _ = transformers_run(family, hf_models[0], CONFIG, call, pinned=plan)
    expected64, _ = transformers_run(family, hf_models[1], CONFIG, call, pinned=plan)
    assert_close_to_reference(got, expected64, expected32)
    assert len(tokens) == len(blocks_of(model)) - 1
    unread, _ = transformers_run(FAMILIES[family_id], hf_models[0], CONFIG, call, pinned=plan)
    assert (got - unread).abs().max().item() > TOLERANCE_FACTOR * tolerance(torch.float32).atol


def attention_of(block, path):
    for name in path.split("."):
        block = getattr(block, name)
    return block


@pytest.mark.parametrize("as_layers", [2, 0])
@pytest.mark.parametrize("name", CALLS)
def test_every_attention_call_gets_metadata_of_its_segments(model, family_id, name, as_layers):
    """SGLang's GPU attention backends read their segments from ``forward_metadata``, the CPU
    ``sdpa`` backend from ``cu_seqlens``: each call's metadata must describe its own segments
    (``cu_seqlens``, ``seq_lens``, ``max_seqlen``) and cover its rows, pruned blocks included."""
    family = FAMILIES[family_id]
    config = ik.IPCVConfig(**{**SETTINGS, "as_layers": as_layers})
    calls: list[tuple[int, torch.Tensor, Any]] = []
    attentions = [attention_of(block, family.attention_path) for block in blocks_of(model)]
    for attention in attentions:

        def record(x, *args, _original=attention.forward, **kwargs):
            calls.append((x.shape[0] * x.shape[1], kwargs["cu_seqlens"], kwargs["forward_metadata"]))
            return _original(x, *args, **kwargs)

        attention.forward = record
    try:
        _, tokens, _ = encode(model, family.make_call(model, name, next(_fresh)), config)
    finally:
        for attention in attentions:
            del attention.forward
    expected_blocks = family.own_attention(len(attentions), config)
    assert [rows for rows, _, _ in calls] == [tokens[i] for i in expected_blocks]
    assert any(i >= config.prune_layer for i in expected_blocks) == (family_id != "internvl_chat")
    for rows, cu_seqlens, metadata in calls:
        cu_seqlens = torch.as_tensor(cu_seqlens).to(torch.int32)
        assert metadata is not None
        assert torch.equal(metadata.cu_seqlens.cpu(), cu_seqlens.cpu())
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        assert torch.equal(metadata.seq_lens.cpu(), lengths.cpu())
        assert metadata.max_seqlen == int(lengths.max())
        assert int(cu_seqlens[-1]) == rows
