"""IPCV on stock Hugging Face GLM-4.1V / 4.5V / 4.6V, beyond the family table's checks (which run
GLM-4.1V): GLM-4.5V (MoE decoder, its own tower class) and GLM-4.6V (``Glm46V*``) found as the row
and run at ratio 0, with generate and exact removal, and FastV on the MoE decoder; a video through
the model is planned frame by frame (the model gives its tower one ``grid_thw`` row per frame),
as the spec (§5.13) and the vLLM / SGLang adapters say."""

from __future__ import annotations

import pytest
import torch
from conftest import check_generate_and_ratio_zero

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, find_family
from ipcv_kernels.families.row import TinyModel
from ipcv_kernels.reference import keep_count
from ipcv_kernels.testing import models as tiny
from ipcv_kernels.testing import processors
from ipcv_kernels.testing.models import glm4v_prompt, vision_inputs

MOE_TEXT = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}


def variant(config_class: str, model_class: str, text: dict) -> TinyModel:
    """The family's tiny model in another of its classes, the text config extended by ``text``."""

    def fields(overrides: dict) -> dict:
        return tiny.glm4v_fields({**text, **overrides})

    return TinyModel(config_class, model_class, fields, glm4v_prompt, processors.qwen_processor)


VARIANTS = {
    "glm-4.5v": variant("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", MOE_TEXT),
    "glm-4.6v": variant("Glm46VConfig", "Glm46VForConditionalGeneration", {}),
}
IPCV = ik.IPCVConfig(prune_layer=2, ratio=0.65, as_layers=1, num_neighbors=3)


@pytest.mark.parametrize("name", VARIANTS)
def test_other_versions_are_the_glm4v_row_ratio_zero_generate_remove(name):
    model = VARIANTS[name].build()
    assert find_family(model)[0].id == "glm4v"
    inputs = glm4v_prompt(model, 1)  # 4 x 4 patches: 16 tokens, 5 kept from block 2 on
    check_generate_and_ratio_zero(model, inputs, [16, 16, 5, 5, 5, 5])


def test_fastv_on_the_moe_decoder_generates():
    model = VARIANTS["glm-4.5v"].build()
    inputs = glm4v_prompt(model, 2)
    ik.apply_ipcv(model, IPCV, llm_pruner=ik.FastV(layer=1, ratio=0.5))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert ik.get_llm_pruning_patch(model).last_kept.shape[1] < inputs["input_ids"].shape[1]


def test_a_video_is_planned_frame_by_frame():
    model = build_model("glm4v")
    config = model.config
    # One video of 2 temporal patches of 4 x 6 patches: the model calls its tower with 2 rows.
    inputs = vision_inputs(
        model, [[2, 4, 6]], video=True, bounds=(config.video_start_token_id, config.video_end_token_id)
    )
    seen = []
    handle = model.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["grid_thw"].tolist()), with_kwargs=True
    )
    try:
        with torch.no_grad(), ik.ipcv_applied(model, IPCV):
            model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            tokens = ik.get_ipcv_patch(model).last_tokens_per_block
    finally:
        handle.remove()
    assert seen == [[[1, 4, 6], [1, 4, 6]]]
    # Each frame its own item: 2 x keep_count(24), not keep_count(48).
    assert tokens == [48, 48] + [2 * keep_count(24, IPCV.ratio)] * 4
