"""The evaluation entry point: request runner, model-argument parsing, and the lmms-eval plugin.

The model is a tiny random Qwen2-VL saved to disk and loaded back by the runner, with the tiny
Qwen families' processor (``ipcv_kernels.testing.processors``). Every row of the family table with
a tiny model answers one request through the one plugin model ``ipcv``, with the row's model and
processor. The
lmms-eval tests run when lmms-eval is importable (``pip install --no-deps lmms-eval pytz loguru``
is enough for them) and skip otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles.rows import row_params
from PIL import Image

from ipcv_kernels import DART, FastV, IPCVConfig, apply_ipcv, get_llm_pruning_patch
from ipcv_kernels.api import get_ipcv_patch
from ipcv_kernels.eval import MultimodalRunner, build_settings
from ipcv_kernels.families import FAMILIES as TABLE
from ipcv_kernels.families import family, find_language_model
from ipcv_kernels.llm import non_attention_layers
from ipcv_kernels.testing.models import build_qwen2_vl_model
from ipcv_kernels.testing.processors import ProcessorUnavailable, TinyQwen2VLProcessor

IPCV = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=2, num_neighbors=3)


def image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2_vl")
    build_qwen2_vl_model().save_pretrained(folder)
    return str(folder)


def test_runner_loads_patches_and_answers(checkpoint):
    runner = MultimodalRunner.from_pretrained(
        checkpoint,
        ipcv_config=IPCV,
        llm_pruner=DART(layer=2, ratio=0.5, pivot_image_tokens=2, pivot_text_tokens=2),
        device="cpu",
        dtype="float32",
        processor=TinyQwen2VLProcessor(),
        max_new_tokens=3,
    )
    assert get_ipcv_patch(runner.model).config == IPCV
    contexts, visuals = ["what is this ?", "describe it ."], [[image(16, 16, 0)], [image(8, 12, 1)]]
    answers = runner.generate(contexts, visuals, {"until": ["\n"]})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # 16 and 6 image tokens; the longer row drops 8 of its 16, the shorter 3 of 6 plus 5 padding.
    length = runner.encode([runner.prompt(c, v) for c, v in zip(contexts, visuals, strict=True)], visuals)[
        "input_ids"
    ].shape[1]
    assert get_llm_pruning_patch(runner.model).last_kept.shape == (2, length - 8)

    logprob, greedy = runner.loglikelihood("is this a cat ?", " yes", [image(16, 16, 0)])
    assert logprob < 0 and isinstance(greedy, bool)


def test_runner_baseline_is_unpatched(checkpoint):
    runner = MultimodalRunner.from_pretrained(
        checkpoint, device="cpu", dtype="float32", processor=TinyQwen2VLProcessor(), max_new_tokens=2
    )
    assert get_ipcv_patch(runner.model) is None and get_llm_pruning_patch(runner.model) is None
    assert len(runner.generate(["what is this ?"], [[image(16, 16, 0)]])) == 1


def test_build_settings_parses_model_arguments():
    config, pruner = build_settings(ipcv_ratio="0.5", ipcv_prune_layer="2", llm_pruner="DART", llm_ratio=0.6)
    assert config == IPCVConfig(prune_layer=2, ratio=0.5)
    assert pruner == DART(layer=2, ratio=0.6)
    assert build_settings(ipcv=False, llm_pruner="fastv", llm_layer=3) == (None, FastV(layer=3))
    assert build_settings(ipcv="false") == (None, None)
    config, _ = build_settings(ipcv_ops_backend="torch", ipcv_attention_backend="sdpa")
    assert (config.ops_backend, config.attention_backend) == ("torch", "sdpa")
    with pytest.raises(ValueError, match="llm_pruner"):
        build_settings(llm_pruner="sparsevlm")
    with pytest.raises(ValueError, match="ipcv"):
        build_settings(ipcv="maybe")
    with pytest.raises(ValueError, match="ratio"):
        build_settings(llm_pruner="fastv", llm_ratio="1.5")
    with pytest.raises(ValueError, match="llm_layer"):
        build_settings(llm_pruner="fastv", llm_layer="two")


def test_lmms_eval_loads_the_plugin_and_answers(checkpoint):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from ipcv_kernels.eval.lmms_eval_model import IPCVModel

    model_class = get_model("ipcv_qwen2_vl")  # found through the package's entry point
    assert model_class is IPCVModel
    arguments = (
        f"pretrained={checkpoint},dtype=float32,max_new_tokens=3,ipcv_prune_layer=2,ipcv_ratio=0.5,"
        "ipcv_as_layers=2,ipcv_num_neighbors=3,llm_pruner=fastv,llm_layer=2,llm_ratio=0.5"
    )
    lm = model_class.create_from_arg_string(
        arguments, {"batch_size": 1, "device": "cpu", "processor": TinyQwen2VLProcessor()}
    )
    assert get_llm_pruning_patch(lm.model).pruner == FastV(layer=2, ratio=0.5)
    lm.task_dict = {"toy": {"test": {0: {"image": image(16, 16, 0), "answer": " yes"}}}}

    def request(kind, arguments):
        return Instance(kind, arguments, idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})

    def visuals(doc):
        return [doc["image"]]

    generated = lm.generate_until(
        [request("generate_until", ("what is this ?", {"until": ["."]}, visuals, 0, "toy", "test"))]
    )
    assert len(generated) == 1 and isinstance(generated[0], str)
    scored = lm.loglikelihood(
        [request("loglikelihood", ("is this a cat ?", lambda doc: doc["answer"], visuals, 0, "toy", "test"))]
    )
    assert len(scored) == 1 and scored[0][0] < 0
    assert torch.is_tensor(get_llm_pruning_patch(lm.model).last_kept)


# -- one plugin model for every family ------------------------------------------------------------

# Every row of the family table with a tiny full model: its model and processor come from the row.
FAMILIES = row_params(row.id for row in TABLE if row.tiny_model is not None)


def tiny_processor(family_id: str):
    """The row's tiny processor; skipped where this transformers cannot build it (transformers
    5.17's Gemma 4 processor imports torchvision, which the test environments do not install)."""
    try:
        return family(family_id).tiny_model.processor()
    except ProcessorUnavailable as error:
        pytest.skip(str(error))


def takes_llm_pruning(family_id: str, model: torch.nn.Module) -> bool:
    """Whether ``model``'s decoder takes LLM-side pruning: refused where the row says why
    (``HFClasses.llm_refusal``) and on hybrid decoders (Qwen3.5's linear attention). Such
    families answer with IPCV in the tower alone, and the refusal is checked."""
    if family(family_id).hf.llm_refusal is not None:
        return False
    return not non_attention_layers(find_language_model(model)[1])


@pytest.mark.parametrize("family_id", FAMILIES)
def test_runner_batches_prompts_of_every_family(family_id):
    """Two prompts with an image each, of different sizes, answered in one batch: the images
    reach the processor nested per prompt (a flat list gives Gemma 3's and SmolVLM's processors
    every image for the first prompt) and the pruned prefill keeps rows for both."""
    from ipcv_kernels.families import build_model

    processor = tiny_processor(family_id)
    model = build_model(family_id)
    pruning = takes_llm_pruning(family_id, model)
    if pruning:
        model = apply_ipcv(model, llm_pruner=FastV(layer=1, ratio=0.5))
    else:  # the decoder refuses LLM-side pruners: IPCV in the tower only
        with pytest.raises(TypeError, match="llm_pruner: not supported"):
            apply_ipcv(model, llm_pruner=FastV(layer=1, ratio=0.5))
        model = apply_ipcv(model, IPCV)
    runner = MultimodalRunner(model, processor, system_prompt="", max_new_tokens=2)
    answers = runner.generate(["what is this ?", "is this a cat ?"], [[image(40, 56, 0)], [image(24, 64, 1)]])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    if pruning:
        assert get_llm_pruning_patch(model).last_kept.shape[0] == 2
    else:  # the images reached the patched tower
        tokens = get_ipcv_patch(model).last_tokens_per_block
        assert tokens[-1] < tokens[0]


@pytest.mark.parametrize("family_id", FAMILIES)
def test_lmms_eval_plugin_answers_for_every_family(family_id, tmp_path):
    """The one plugin model loads a tiny checkpoint of each family (found through the family
    table), with IPCV in its tower and FastV in its decoder, and answers one request."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from ipcv_kernels.eval.lmms_eval_model import IPCVModel
    from ipcv_kernels.families import build_model

    processor = tiny_processor(family_id)
    built = build_model(family_id)
    pruning = takes_llm_pruning(family_id, built)
    built.save_pretrained(tmp_path)
    model_class = get_model("ipcv")
    assert model_class is IPCVModel and get_model("ipcv_qwen2_vl") is IPCVModel
    arguments = (
        f"pretrained={tmp_path},dtype=float32,max_new_tokens=3,system_prompt=,ipcv_prune_layer=2,ipcv_ratio=0.5,"
        "ipcv_as_layers=1,ipcv_num_neighbors=3"
    )
    llm = ",llm_pruner=fastv,llm_layer=1,llm_ratio=0.5"
    extra = {"batch_size": 1, "device": "cpu", "processor": processor}
    if not pruning:  # the decoder refuses the pruner: IPCV in the tower answers alone
        with pytest.raises(TypeError, match="llm_pruner: not supported"):
            model_class.create_from_arg_string(arguments + llm, extra)
    lm = model_class.create_from_arg_string(arguments + (llm if pruning else ""), extra)
    assert get_ipcv_patch(lm.model).config == IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
    lm.task_dict = {"toy": {"test": {0: {"image": image(40, 56, 0)}}}}
    request = Instance(
        "generate_until",
        ("what is this ?", {"until": ["."]}, lambda doc: [doc["image"]], 0, "toy", "test"),
        idx=0,
        metadata={"task": "toy", "doc_id": 0, "repeats": 1},
    )
    answers = lm.generate_until([request])
    assert len(answers) == 1 and isinstance(answers[0], str)
    if pruning:
        kept = get_llm_pruning_patch(lm.model).last_kept  # the prefill was pruned
        assert kept is not None and kept.shape[0] == 1
    else:  # the image reached the patched tower
        tokens = get_ipcv_patch(lm.model).last_tokens_per_block
        assert tokens[-1] < tokens[0]
