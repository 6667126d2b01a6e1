"""LLM-side pruning (FastV, DART) on the language models of tiny random models of every family with
one (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA 1.5, LLaVA-NeXT, LLaVA-OneVision, Gemma 3,
PaliGemma, Idefics3, SmolVLM), alone and composed with IPCV."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from oracles.towers import build_model, internvl_inputs
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from ipcv_kernels import (
    DART,
    FastV,
    IPCVConfig,
    LLMPruner,
    apply_ipcv,
    get_ipcv_patch,
    get_llm_pruning_patch,
    remove_ipcv,
)
from ipcv_kernels.families import find_language_model
from ipcv_kernels.llm import PruningInputs
from ipcv_kernels.llm.pruners import decoder_last_query_and_keys, fastv_received_attention
from ipcv_kernels.reference.llm_pruning import (
    dart_select_reference,
    fastv_attention_reference,
    fastv_select_reference,
    llm_keep_count,
)
from ipcv_kernels.testing import assert_close
from ipcv_kernels.testing.models import (
    build_qwen2_vl_model,
    clip_family_inputs,
    clip_pixels,
    glm4v_prompt,
    idefics3_inputs,
    onevision_inputs,
    vision_inputs,
)

LAYER = 2
# Families whose prompt differs from Qwen's layout (one image of 4 x 8 patches otherwise).
ROWS_PROMPT = {"glm4v": lambda model, images=1: glm4v_prompt(model, images)}
NUM_LAYERS = 4  # ipcv_kernels.testing.models.TINY_TEXT
PRUNERS = [FastV(layer=LAYER, ratio=0.6), DART(layer=LAYER, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)]
IPCV = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=2, num_neighbors=3)


@pytest.fixture(scope="module")
def model():
    return build_qwen2_vl_model()


@pytest.fixture(scope="module")
def model64():
    return build_qwen2_vl_model(dtype=torch.float64)


@pytest.fixture(autouse=True)
def unpatched(model):
    remove_ipcv(model)
    yield
    remove_ipcv(model)


def greedy(model, inputs, new_tokens=4, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **kwargs,
        )


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def padded_batch(model, grids: list[list[list[int]]]) -> dict[str, torch.Tensor]:
    """Left-padded batch of one-image prompts (one ``grid_thw`` list per row)."""
    rows = [vision_inputs(model, grid, seed=i) for i, grid in enumerate(grids)]
    length = max(row["input_ids"].shape[1] for row in rows)

    def pad(key):
        return torch.cat([torch.nn.functional.pad(r[key], (length - r[key].shape[1], 0)) for r in rows])

    return {
        "input_ids": pad("input_ids"),
        "attention_mask": pad("attention_mask"),
        "mm_token_type_ids": pad("mm_token_type_ids"),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows]),
    }


def attention_lengths(model) -> tuple[list[int], list]:
    """Record the query length every decoder layer's attention sees (per call, in order)."""
    seen: list[int] = []
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
        )
        for layer in model.model.language_model.layers
    ]
    return seen, handles


def image_token_count(model, inputs) -> int:
    ids = inputs["input_ids"][0]
    video = getattr(model.config, "video_token_id", None)  # the CLIP / SigLIP families have none
    return int(((ids == model.config.image_token_id) | (ids == video)).sum())


# -- selection rules against their references ---------------------------------------------------


def hand_built_inputs(model64, batch=2, length=24, seed=0):
    """Random hidden states, image tokens at 4..17, padding at the start of row 1."""
    generator = torch.Generator().manual_seed(seed)
    text_model = model64.model.language_model
    width = text_model.config.hidden_size
    hidden = torch.randn(batch, length, width, generator=generator, dtype=torch.float64)
    hidden_before = torch.randn(batch, length, width, generator=generator, dtype=torch.float64)
    positions = torch.arange(length).expand(3, batch, length)
    cos, sin = text_model.rotary_emb(hidden, positions)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, 4:18] = True
    padding = torch.zeros_like(visual)
    padding[1, :2] = True
    inputs = PruningInputs(
        layers=text_model.layers,
        hidden=hidden,
        hidden_before=hidden_before,
        position_embeddings=(cos, sin),
        candidates=visual & ~padding,
        text=~visual & ~padding,
        padding=padding,
    )
    return inputs


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.95])
def test_fastv_selection_matches_reference(model64, ratio):
    inputs = hand_built_inputs(model64)
    num_keep = [llm_keep_count(int(c.sum()), ratio) for c in inputs.candidates]
    chosen = FastV(layer=LAYER, ratio=ratio).select(inputs, num_keep)
    # The reference gets every token's rotary query / key, computed here with transformers' own
    # rotary function from layer K-1's projections.
    layer = inputs.layers[LAYER - 1]
    attention = layer.self_attn
    normed = layer.input_layernorm(inputs.hidden_before)
    batch, length, _ = normed.shape
    query = attention.q_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *inputs.position_embeddings)
    for row in range(batch):
        expected = fastv_select_reference(
            query[row], key[row], attention.scaling, inputs.candidates[row], num_keep[row], inputs.padding[row]
        )
        received = fastv_attention_reference(query[row], key[row], attention.scaling, inputs.padding[row])
        assert len(chosen[row]) == num_keep[row]
        # Tie-robust: the kept tokens' scores are the top scores.
        torch.testing.assert_close(received[chosen[row]].sort().values, received[expected].sort().values)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.95])
@pytest.mark.parametrize("pivots", [(1, 0), (4, 4), (2, 3)])
def test_dart_selection_matches_reference(model64, ratio, pivots):
    inputs = hand_built_inputs(model64, seed=1)
    num_keep = [llm_keep_count(int(c.sum()), ratio) for c in inputs.candidates]
    pruner = DART(layer=LAYER, ratio=ratio, pivot_image_tokens=pivots[0], pivot_text_tokens=pivots[1])
    chosen = pruner.select(inputs, num_keep)
    layer = inputs.layers[LAYER]
    keys = layer.self_attn.k_proj(layer.input_layernorm(inputs.hidden))
    for row in range(len(num_keep)):
        expected = dart_select_reference(
            inputs.hidden[row], keys[row], inputs.candidates[row], inputs.text[row], num_keep[row], *pivots
        )
        # float64 data: no near-ties, so the greedy choices agree exactly.
        assert torch.equal(chosen[row], expected)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "glm4v"])
def test_fastv_scores_are_the_models_attention_weights(family):
    """What FastV computes under sdpa equals what eager attention reports (output_attentions);
    Qwen3-VL's attention normalises q and k per head before the rotary; GLM-4's rotary covers
    part of each head, in interleaved pairs."""
    if family == "qwen2_vl":
        eager = build_qwen2_vl_model(attn_implementation="eager")
    else:
        eager = build_model(family, attn="eager")
    inputs = ROWS_PROMPT[family](eager) if family in ROWS_PROMPT else vision_inputs(eager, [[1, 4, 8]])
    layer = eager.model.language_model.layers[LAYER - 1]
    seen = {}

    def record(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["rotary"] = kwargs["position_embeddings"]

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = eager(**inputs, output_attentions=True)
            query, keys, scaling = decoder_last_query_and_keys(layer, seen["hidden"], seen["rotary"])
            padding = torch.zeros(seen["hidden"].shape[:2], dtype=torch.bool)
            received = fastv_received_attention(query, keys, scaling, padding)
    finally:
        handle.remove()
    expected = out.attentions[LAYER - 1][:, :, -1, :].mean(dim=1)
    assert_close(received, expected)


# -- the patched model ----------------------------------------------------------------------------


@pytest.mark.parametrize("pruner", [FastV(layer=LAYER, ratio=0.0), DART(layer=1, ratio=0.0)], ids=["fastv", "dart"])
def test_ratio_zero_changes_nothing(model, pruner):
    inputs = vision_inputs(model, [[1, 4, 8]])
    expected_logits, expected = logits(model, inputs), greedy(model, inputs)
    apply_ipcv(model, llm_pruner=pruner)
    assert get_ipcv_patch(model) is None  # config=None with a pruner: no vision-side IPCV
    assert get_llm_pruning_patch(model) is not None
    torch.testing.assert_close(logits(model, inputs), expected_logits, atol=0, rtol=0)
    out = greedy(model, inputs)
    assert torch.equal(out.sequences, expected.sequences)


@pytest.mark.parametrize("pruner", PRUNERS, ids=["fastv", "dart"])
def test_decoder_layers_from_k_see_the_kept_tokens(model, pruner):
    inputs = vision_inputs(model, [[1, 6, 8]])
    length = inputs["input_ids"].shape[1]
    images = image_token_count(model, inputs)
    apply_ipcv(model, llm_pruner=pruner)
    seen, handles = attention_lengths(model)
    try:
        out_logits = logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    kept = length - (images - llm_keep_count(images, pruner.ratio))
    assert seen == [length] * LAYER + [kept] * (NUM_LAYERS - LAYER)
    assert out_logits.shape[1] == length  # dropped rows restored: outputs keep their shapes
    assert get_llm_pruning_patch(model).last_kept.shape == (1, kept)


def family_model(family: str, dtype: torch.dtype = torch.float32):
    return build_qwen2_vl_model(dtype=dtype) if family == "qwen2_vl" else build_model(family, dtype=dtype)


def decoder(model):
    """The decoder the LLM-side patch wraps, found through the family table (Idefics3 and SmolVLM
    name it ``text_model``)."""
    return find_language_model(model)[1]


def masked_attention_logits(model, inputs, kept: torch.Tensor, layer: int) -> torch.Tensor:
    """The oracle of pruning at ``layer``: the unpatched model in which decoder layers ``>= layer``
    attend only to the ``kept`` tokens (the mask the model builds for the layer, causal where it
    passes none, AND kept key columns; every other token still sees itself, so its row stays
    finite, but no kept token reads it). One prompt, sdpa (boolean masks: True = attend)."""
    length = inputs["input_ids"].shape[1]
    is_kept = torch.zeros(length, dtype=torch.bool)
    is_kept[kept] = True
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = is_kept[None, :] | torch.eye(length, dtype=torch.bool)
    layers = decoder(model).layers[layer:]
    for decoder_layer in layers:

        def masked(hidden, *args, _forward=decoder_layer.forward, **kwargs):
            own = kwargs.get("attention_mask")
            own = causal if own is None else own
            return _forward(hidden, *args, **{**kwargs, "attention_mask": own & allowed})

        decoder_layer.forward = masked
    try:
        return logits(model, inputs)
    finally:
        for decoder_layer in layers:
            del decoder_layer.forward


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "glm4v"])
@pytest.mark.parametrize(
    "pruner",
    [FastV(layer=1, ratio=0.6), DART(layer=1, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)],
    ids=["fastv", "dart"],
)
def test_pruned_prefill_equals_masked_attention(family, pruner):
    """Dropping tokens from layer K on is masking them out of every later layer's keys: the kept
    positions' logits equal that oracle's (fp64), so the kept tokens keep their positions, rotary
    and causal order, and (Qwen3-VL) receive their own DeepStack features at layers >= K."""
    model = family_model(family, torch.float64)
    if family in ROWS_PROMPT:
        inputs = ROWS_PROMPT[family](model, 2)
    else:
        inputs = (
            internvl_inputs(model, [2, 1]) if family == "internvl" else vision_inputs(model, [[1, 4, 8], [1, 4, 4]])
        )
    apply_ipcv(model, llm_pruner=pruner)
    pruned = logits(model, inputs)
    kept = get_llm_pruning_patch(model).last_kept[0]
    remove_ipcv(model)
    assert kept.shape[0] < inputs["input_ids"].shape[1]
    expected = masked_attention_logits(model, inputs, kept, pruner.layer)
    assert_close(pruned[0, kept], expected[0, kept])


@pytest.mark.parametrize("pruner", PRUNERS, ids=["fastv", "dart"])
def test_generation_cache_positions_and_logits(model, pruner):
    check_generation(model, pruner)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
@pytest.mark.parametrize("pruner", PRUNERS, ids=["fastv", "dart"])
def test_generation_of_other_families(family, pruner):
    model = build_model(family)
    check_generation(model, pruner, ROWS_PROMPT[family](model) if family in ROWS_PROMPT else None)


def check_generation(model, pruner, inputs=None, ipcv=IPCV, next_token_type=0):
    """After prefill, layers >= K cache only the kept tokens; the first token's logits are the
    patched prefill forward's; decoding uses the unpruned positions; and a decoding step equals a
    full forward over prompt + generated token that prunes the same image tokens (the token's
    ``token_type_ids`` entry ``next_token_type`` where the inputs have them)."""
    inputs = inputs if inputs is not None else vision_inputs(model, [[1, 4, 8]])
    length = inputs["input_ids"].shape[1]
    text_model = decoder(model)
    num_layers = len(text_model.layers)
    positions: list[torch.Tensor] = []
    handle = text_model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs.get("position_ids")), with_kwargs=True
    )
    try:
        greedy(model, inputs, new_tokens=3)
        unpruned_positions = list(positions)
        positions.clear()
        apply_ipcv(model, ipcv, llm_pruner=pruner)
        out = greedy(model, inputs, new_tokens=3)
    finally:
        handle.remove()
    assert len(positions) == len(unpruned_positions) == 3
    for got, expected in zip(positions, unpruned_positions, strict=True):
        assert (got is None and expected is None) or torch.equal(got, expected)

    patch = get_llm_pruning_patch(model)
    kept = patch.last_kept.shape[1]
    cache = out.past_key_values
    steps = out.sequences.shape[1] - length
    cached = [cache.layers[i].get_seq_length() for i in range(num_layers)]
    assert cached == [length + steps - 1] * pruner.layer + [kept + steps - 1] * (num_layers - pruner.layer)
    assert cache.get_seq_length() == length + steps - 1
    assert_close(out.logits[0], logits(model, inputs)[:, -1])

    # The second step against a full forward whose pruner keeps the prefill's image tokens.
    visual = torch.isin(inputs["input_ids"][0], torch.tensor(patch.visual_token_ids))
    pinned = [patch.last_kept[0][visual[patch.last_kept[0]]]]
    extended = dict(inputs)
    first = out.sequences[:, length : length + 1]
    extended["input_ids"] = torch.cat([inputs["input_ids"], first], dim=1)
    extended["attention_mask"] = torch.ones_like(extended["input_ids"])
    if "mm_token_type_ids" in inputs:
        extended["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 1))
    if "token_type_ids" in inputs:
        extended["token_type_ids"] = torch.nn.functional.pad(inputs["token_type_ids"], (0, 1), value=next_token_type)
    apply_ipcv(model, ipcv, llm_pruner=Pinned(layer=pruner.layer, ratio=pruner.ratio, kept=pinned))
    assert_close(out.logits[1], logits(model, extended)[:, -1])


def test_internvl_generation():
    # InternVL's Qwen2 decoder: 1-D rotary positions, image tokens only; with IPCV in its tower.
    model = build_model("internvl")
    ipcv = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=2, num_neighbors=3)
    for pruner in (FastV(layer=1, ratio=0.6), DART(layer=1, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)):
        remove_ipcv(model)
        check_generation(model, pruner, internvl_inputs(model, [2, 1]), ipcv)


@dataclass(frozen=True)
class Pinned(LLMPruner):
    """A pruner that keeps given candidate positions (a custom pruner, for the decoding check)."""

    kept: list | None = None

    def select(self, inputs: PruningInputs, num_keep: list[int]) -> list[torch.Tensor]:
        assert [len(k) for k in self.kept] == num_keep
        return self.kept


@pytest.mark.parametrize("pruner", PRUNERS, ids=["fastv", "dart"])
def test_padded_image_batch_equals_rows_alone(model, pruner):
    """Rows of different image sizes (left padding, sdpa boolean masks) each keep their share and
    generate what they generate alone."""
    grids = [[[1, 6, 8]], [[1, 4, 4]]]
    batch = padded_batch(model, grids)
    apply_ipcv(model, IPCV, llm_pruner=pruner)
    out = greedy(model, batch)
    for row, grid in enumerate(grids):
        alone = greedy(model, vision_inputs(model, grid, seed=row))
        new = alone.sequences.shape[1] - vision_inputs(model, grid).get("input_ids").shape[1]
        assert torch.equal(out.sequences[row, -new:], alone.sequences[0, -new:])
        assert_close(out.logits[0][row], alone.logits[0][0])


@pytest.mark.parametrize("pruner", PRUNERS, ids=["fastv", "dart"])
def test_generate_runs_for_video_multi_image_and_eager(pruner):
    eager = build_qwen2_vl_model(attn_implementation="eager")
    apply_ipcv(eager, IPCV, llm_pruner=pruner)
    patch = get_llm_pruning_patch(eager)
    for inputs in (vision_inputs(eager, [[2, 4, 4]], video=True), vision_inputs(eager, [[1, 4, 4], [1, 4, 8]])):
        out = greedy(eager, inputs, new_tokens=3)
        images = image_token_count(eager, inputs)
        assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 3)
        assert patch.last_kept.shape[1] == inputs["input_ids"].shape[1] - images + llm_keep_count(images, pruner.ratio)


def test_text_only_input_prunes_nothing(model):
    inputs = {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 6, dtype=torch.int64)}
    expected = logits(model, inputs)
    apply_ipcv(model, llm_pruner=FastV(layer=LAYER, ratio=0.9))
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)


def test_apply_and_remove_both_sides(model):
    inputs = vision_inputs(model, [[1, 4, 8]])
    expected = logits(model, inputs)
    apply_ipcv(model, IPCV, llm_pruner=DART(layer=LAYER, ratio=0.7))
    assert get_ipcv_patch(model) is not None and get_llm_pruning_patch(model) is not None
    assert not torch.allclose(logits(model, inputs), expected)
    apply_ipcv(model)  # replaces both: default IPCV only
    assert get_ipcv_patch(model).config == IPCVConfig() and get_llm_pruning_patch(model) is None
    remove_ipcv(model)
    assert get_ipcv_patch(model) is None and get_llm_pruning_patch(model) is None
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)


def test_bad_settings(model):
    with pytest.raises(ValueError, match="layer"):
        apply_ipcv(model, llm_pruner=FastV(layer=NUM_LAYERS, ratio=0.5))
    assert get_llm_pruning_patch(model) is None  # validated before touching the model
    with pytest.raises(ValueError, match="layer"):
        FastV(layer=0)
    with pytest.raises(ValueError, match="ratio"):
        DART(ratio=1.0)
    with pytest.raises(ValueError, match="ratio"):
        FastV(ratio=-0.1)
    with pytest.raises(TypeError, match="ratio"):
        FastV(ratio="0.5")
    with pytest.raises(ValueError, match="pivot_image_tokens"):
        DART(pivot_image_tokens=0)
    with pytest.raises(TypeError, match="llm_pruner"):
        apply_ipcv(model, llm_pruner="fastv")
    with pytest.raises(TypeError, match="llm_pruner"):
        apply_ipcv(model.model.visual, llm_pruner=FastV())


def padding_mask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that takes flash-attention-style masks: ``None`` (causal) or a 2-D ``[B, kv]``
    padding mask, causal aligned bottom-right as flash attention does; computed with sdpa."""
    query_length, key_length = query.shape[2], key.shape[2]
    allowed = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device)
    if getattr(module, "is_causal", True):
        allowed = allowed.tril(key_length - query_length)
    allowed = allowed.expand(query.shape[0], 1, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # padding queries: any finite output
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("pruner", PRUNERS, ids=["fastv", "dart"])
def test_flash_style_padding_masks(model, pruner):
    """The 2-D padding masks of flash attention are cut down like the 4-D ones (same logits)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("ipcv_test_padding_mask", padding_mask_attention)
    AttentionMaskInterface.register("ipcv_test_padding_mask", flash_attention_mask)
    flash_style = build_qwen2_vl_model(attn_implementation="ipcv_test_padding_mask")
    batch = padded_batch(model, [[[1, 6, 8]], [[1, 4, 4]]])
    expected = greedy(model, batch)  # sdpa, unpatched
    assert_close(greedy(flash_style, batch).logits[0], expected.logits[0])
    apply_ipcv(model, llm_pruner=pruner)
    apply_ipcv(flash_style, llm_pruner=pruner)
    expected, out = greedy(model, batch), greedy(flash_style, batch)
    assert torch.equal(get_llm_pruning_patch(flash_style).last_kept, get_llm_pruning_patch(model).last_kept)
    for step_logits, expected_logits in zip(out.logits, expected.logits, strict=True):
        assert_close(step_logits, expected_logits)


# -- the CLIP / SigLIP families: LLaVA 1.5, LLaVA-NeXT (Llama), Gemma 3, PaliGemma (Gemma) ---------

CLIP_FAMILIES = ["llava", "llava_next", "gemma3", "paligemma"]
# Gemma 3 with both layer types: sliding (window 8, shorter than the prompts), full, sliding.
GEMMA3_TEXT = dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
CLIP_IPCV = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)


def clip_family_model(family: str, dtype: torch.dtype = torch.float32):
    return build_model(family, dtype=dtype, text_overrides=GEMMA3_TEXT if family == "gemma3" else None)


def clip_family_prompt(model, family: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt with images for ``family``: LLaVA / Gemma 3 two images, LLaVA-NeXT two 32 x 64
    images (base crop + 2 tiles each, the token count the model itself computes), PaliGemma one.
    Gemma 3 gets ``token_type_ids`` (bidirectional attention within each image) and PaliGemma an
    all-prefix one (bidirectional over image + prompt), as their processors pass them."""
    if family == "llava_next":
        pixels = clip_pixels(10, dtype=model.dtype, seed=seed).view(2, 5, 3, 32, 32)
        sizes = torch.tensor([[32, 64], [64, 32]])
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        ids = [3, 4, 5]
        for image_features in features:
            ids += [model.config.image_token_id] * len(image_features) + [6]
        input_ids = torch.tensor([ids])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels,
            "image_sizes": sizes,
        }
    inputs = clip_family_inputs(model, 1 if family == "paligemma" else 2, seed=seed)
    if family == "gemma3":
        inputs["token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
    elif family == "paligemma":
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return inputs


def next_token_type(family: str) -> int:
    """The ``token_type_ids`` entry of a generated token: PaliGemma's suffix (causal) is 1."""
    return 1 if family == "paligemma" else 0


@pytest.mark.parametrize("family", CLIP_FAMILIES)
@pytest.mark.parametrize(
    "pruner",
    [FastV(layer=1, ratio=0.6), DART(layer=1, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)],
    ids=["fastv", "dart"],
)
def test_clip_families_pruned_prefill_equals_masked_attention(family, pruner):
    """The masked-attention oracle on Llama / Gemma / Gemma 3 decoders (fp64): the kept tokens keep
    their positions, each layer type its own rotary table and mask (Gemma 3's sliding window and
    image blocks, PaliGemma's prefix)."""
    model = clip_family_model(family, torch.float64)
    inputs = clip_family_prompt(model, family)
    apply_ipcv(model, llm_pruner=pruner)
    pruned = logits(model, inputs)
    kept = get_llm_pruning_patch(model).last_kept[0]
    remove_ipcv(model)
    images = image_token_count(model, inputs)
    assert kept.shape[0] == inputs["input_ids"].shape[1] - images + llm_keep_count(images, pruner.ratio)
    expected = masked_attention_logits(model, inputs, kept, pruner.layer)
    assert_close(pruned[0, kept], expected[0, kept])


@pytest.mark.parametrize("family", CLIP_FAMILIES)
@pytest.mark.parametrize(
    "pruner",
    [FastV(layer=1, ratio=0.6), DART(layer=1, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)],
    ids=["fastv", "dart"],
)
def test_clip_families_generation(family, pruner):
    """With IPCV in the tower: the cache of layers >= K holds the kept tokens (Gemma 3's sliding
    layers count them all), the first token's logits are the patched forward's, and a decoding
    step past the sliding window equals a pruned prefill over prompt + token."""
    model = clip_family_model(family)
    check_generation(model, pruner, clip_family_prompt(model, family), CLIP_IPCV, next_token_type(family))


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_clip_families_padded_batch_equals_rows_alone(family):
    """Prebuilt 4-D masks (the padding is read from the multimodal model's call): rows of a
    left-padded batch generate what they generate alone."""
    model = clip_family_model(family)
    rows = [clip_family_prompt(model, family, seed=0), clip_family_prompt(model, family, seed=1)]
    # The second row two text tokens shorter (the first two), so that it gets two padding tokens.
    text = (rows[1]["input_ids"][0] != model.config.image_token_id).nonzero().flatten()[:2]
    keep = torch.ones(rows[1]["input_ids"].shape[1], dtype=torch.bool)
    keep[text] = False
    rows[1] = {key: value if key == "pixel_values" else value[:, keep] for key, value in rows[1].items()}
    length = rows[0]["input_ids"].shape[1]

    def pad(key):
        return torch.cat([torch.nn.functional.pad(r[key], (length - r[key].shape[1], 0)) for r in rows])

    batch = {key: pad(key) for key in ("input_ids", "attention_mask", "token_type_ids")}
    batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
    apply_ipcv(model, llm_pruner=DART(layer=1, ratio=0.5, pivot_image_tokens=2, pivot_text_tokens=2))
    out = greedy(model, batch)
    for row, inputs in enumerate(rows):
        alone = greedy(model, inputs)
        assert torch.equal(out.sequences[row, length:], alone.sequences[0, inputs["input_ids"].shape[1] :])
        for step, expected in zip(out.logits, alone.logits, strict=True):
            assert_close(step[row], expected[0])


def test_gemma3_needs_a_sliding_layer_before_the_prune_layer():
    model = build_model("gemma3", text_overrides=dict(layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(NotImplementedError, match="sliding-window layer"):
        apply_ipcv(model, llm_pruner=FastV(layer=1, ratio=0.5))
    assert get_llm_pruning_patch(model) is None


# -- LLaVA-OneVision (Qwen2), Idefics3 and SmolVLM (Llama, their decoder is `text_model`) ---------

CROP_FAMILIES = ["llava_onevision", "idefics3", "smolvlm"]


def crop_family_prompt(model, family: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt for ``family``: LLaVA-OneVision a 32 x 64 image (base crop + 2 crops) and a
    64 x 64 one (base crop + 4), token runs as long as the model makes them; Idefics3 / SmolVLM
    three sub-images of 4 tokens each, every one after a ``<fake>`` token (a text token here)."""
    if family == "llava_onevision":
        return onevision_inputs(model, [[32, 64], [64, 64]], seed=seed)
    return idefics3_inputs(model, [3], seed=seed)


def crop_family_batch(model, family: str) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``(left-padded batch of two prompts, each prompt alone)`` with different image-token counts.

    LLaVA-OneVision: a 32 x 64 image, then a 64 x 64 one (the second row longer); Idefics3 /
    SmolVLM: 3 and 2 sub-images, the second row padded (its all-zero third sub-image, which the
    model leaves out, stays in its pixels alone too).
    """
    if family == "llava_onevision":
        rows = [onevision_inputs(model, [[32, 64]], seed=0), onevision_inputs(model, [[64, 64]], seed=1)]
        length = max(row["input_ids"].shape[1] for row in rows)

        def pad(key):
            return torch.cat([torch.nn.functional.pad(r[key], (length - r[key].shape[1], 0)) for r in rows])

        batch = {"input_ids": pad("input_ids"), "attention_mask": pad("attention_mask")}
        batch |= {key: torch.cat([r[key] for r in rows]) for key in ("pixel_values", "image_sizes")}
        return batch, rows
    batch = idefics3_inputs(model, [3, 2])
    rows = []
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        rows.append({key: value[row : row + 1, ...] for key, value in batch.items()})
        rows[-1] |= {key: batch[key][row : row + 1, real] for key in ("input_ids", "attention_mask")}
    return batch, rows


@pytest.mark.parametrize("family", CROP_FAMILIES)
@pytest.mark.parametrize(
    "pruner",
    [FastV(layer=1, ratio=0.6), DART(layer=1, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)],
    ids=["fastv", "dart"],
)
def test_crop_families_pruned_prefill_equals_masked_attention(family, pruner):
    """The masked-attention oracle on LLaVA-OneVision's Qwen2 and Idefics3's / SmolVLM's Llama
    decoders (fp64): the image tokens are found from the config's ``image_token_id`` (and
    OneVision's ``video_token_id``), all crops' tokens are candidates, and the kept tokens keep
    their positions and causal order."""
    model = build_model(family, dtype=torch.float64)
    inputs = crop_family_prompt(model, family)
    apply_ipcv(model, llm_pruner=pruner)
    pruned = logits(model, inputs)
    kept = get_llm_pruning_patch(model).last_kept[0]
    remove_ipcv(model)
    images = image_token_count(model, inputs)
    assert kept.shape[0] == inputs["input_ids"].shape[1] - images + llm_keep_count(images, pruner.ratio)
    expected = masked_attention_logits(model, inputs, kept, pruner.layer)
    assert_close(pruned[0, kept], expected[0, kept])


@pytest.mark.parametrize("family", CROP_FAMILIES)
@pytest.mark.parametrize(
    "pruner",
    [FastV(layer=1, ratio=0.6), DART(layer=1, ratio=0.6, pivot_image_tokens=2, pivot_text_tokens=2)],
    ids=["fastv", "dart"],
)
def test_crop_families_generation(family, pruner):
    """With IPCV in the tower: the cache of layers >= K holds the kept tokens, the first token's
    logits are the patched forward's, and a decoding step equals a pruned prefill over prompt +
    token (Idefics3 / SmolVLM feed their decoder ``inputs_embeds``: the image tokens are read
    from the multimodal model's ``input_ids``)."""
    model = build_model(family)
    check_generation(model, pruner, crop_family_prompt(model, family), CLIP_IPCV)


@pytest.mark.parametrize("family", CROP_FAMILIES)
def test_crop_families_padded_batch_equals_rows_alone(family):
    """Rows with different image-token counts, left-padded, with IPCV and DART: each row
    generates what it generates alone."""
    model = build_model(family)
    batch, rows = crop_family_batch(model, family)
    length = batch["input_ids"].shape[1]
    apply_ipcv(model, CLIP_IPCV, llm_pruner=DART(layer=1, ratio=0.5, pivot_image_tokens=2, pivot_text_tokens=2))
    out = greedy(model, batch)
    assert get_llm_pruning_patch(model).last_kept.shape[0] == 2
    for row, inputs in enumerate(rows):
        alone = greedy(model, inputs)
        assert torch.equal(out.sequences[row, length:], alone.sequences[0, inputs["input_ids"].shape[1] :])
        for step, expected in zip(out.logits, alone.logits, strict=True):
            assert_close(step[row], expected[0])


@pytest.mark.parametrize("family", CROP_FAMILIES)
def test_crop_families_ratio_zero_and_remove_restore_exactly(family):
    """Ratio 0 keeps the unpatched logits bit for bit; a pruning patch changes them, and
    ``remove_ipcv`` restores them exactly and leaves no wrapper on the multimodal model, its
    decoder or the decoder's layers."""
    model = build_model(family)
    inputs = crop_family_prompt(model, family)
    expected = logits(model, inputs)
    apply_ipcv(model, llm_pruner=FastV(layer=1, ratio=0.0))
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)
    apply_ipcv(model, CLIP_IPCV, llm_pruner=DART(layer=1, ratio=0.7, pivot_image_tokens=2, pivot_text_tokens=2))
    assert not torch.allclose(logits(model, inputs), expected)
    remove_ipcv(model)
    assert get_ipcv_patch(model) is None and get_llm_pruning_patch(model) is None
    multimodal, text_model, _ = find_language_model(model)
    assert all("forward" not in vars(module) for module in (multimodal, text_model, *text_model.layers))
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)
