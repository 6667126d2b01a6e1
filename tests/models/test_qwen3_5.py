"""IPCV on stock Hugging Face Qwen3.5, beyond the family table's checks (which run the dense model):
the MoE variant (its own tower and model classes) at ratio 0, against the float64 spec oracle,
with generate and exact removal; and LLM-side pruners refused on the hybrid decoder (Gated
DeltaNet linear-attention layers) of both, before anything is patched."""

from __future__ import annotations

import pytest
import torch
from conftest import check_generate_and_ratio_zero
from oracles.towers import ipcv_tower_oracle, tower_call

import ipcv_kernels as ik
from ipcv_kernels.families import build_model, find_family
from ipcv_kernels.families.row import TinyModel
from ipcv_kernels.llm import DART, FastV
from ipcv_kernels.testing import assert_close, processors
from ipcv_kernels.testing import models as tiny
from ipcv_kernels.testing.models import vision_inputs

MOE = TinyModel(
    "Qwen3_5MoeConfig",
    "Qwen3_5MoeForConditionalGeneration",
    tiny.qwen3_5_moe_fields,
    tiny.qwen_prompt,
    processors.qwen_processor,
)
ORACLE = dict(prune_layer=2, ratio=0.6, as_layers=2, num_neighbors=3)
# The tower applies rotary in fp32 whatever its dtype, IPCV's stabilisation blocks in the input
# dtype: float64 runs agree to fp32 precision.
MODEL_PRECISION = torch.float32


def test_moe_model_is_a_qwen3_5_and_ratio_zero_generate_remove():
    model = MOE.build()
    assert find_family(model)[0].id == "qwen3_5"
    assert type(model.model.visual).__name__ == "Qwen3_5MoeVisionModel"
    # 8 x 12 patches, 65% of them dropped from block 2 on: 33 kept.
    check_generate_and_ratio_zero(model, vision_inputs(model, [[1, 8, 12]]), [96, 96, 33, 33, 33, 33])


@pytest.mark.parametrize("grid", [[[1, 8, 12], [1, 6, 4]], [[2, 8, 8]]], ids=["images", "video"])
def test_moe_tower_matches_float64_spec_oracle(grid):
    tower = MOE.build(dtype=torch.float64).model.visual
    call = tower_call(tower, grid)
    items = [t * h * w for t, h, w in grid]
    with torch.no_grad():
        expected = ipcv_tower_oracle(tower, call, items, **ORACLE)
        with ik.ipcv_applied(tower, ik.IPCVConfig(**ORACLE)):
            got = call()
    assert_close(got.pooler_output, expected.output.pooler_output, dtype=MODEL_PRECISION)


@pytest.mark.parametrize("variant", ["dense", "moe"])
@pytest.mark.parametrize(
    "pruner",
    [FastV(layer=2, ratio=0.5), DART(layer=2, ratio=0.5, pivot_image_tokens=2, pivot_text_tokens=2)],
    ids=["fastv", "dart"],
)
def test_llm_pruners_are_refused_on_the_hybrid_decoder(variant, pruner):
    model = build_model("qwen3_5") if variant == "dense" else MOE.build()
    inputs = vision_inputs(model, [[1, 4, 4]])
    with torch.no_grad():
        expected = model(**inputs).logits
    with pytest.raises(TypeError, match=r"linear attention.*layers \[0, 2\]|layers \[0, 2\].*linear attention"):
        ik.apply_ipcv(model, ik.IPCVConfig(prune_layer=2), llm_pruner=pruner)
    # Refused before anything was patched: neither side is installed.
    assert ik.get_ipcv_patch(model) is None and ik.get_llm_pruning_patch(model) is None
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
