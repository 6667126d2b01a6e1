"""The vLLM plugin's behaviour, on vLLM's own Qwen2-VL (CPU, fp32, eager): ``get_ipcv_patch`` on
an unpatched model; ``generate`` with a video through vLLM's processor equals transformers'
embeddings and greedy tokens; a bad request does not take the engine down; invalid settings fail
when the engine configuration is built, naming the field; settings IPCV cannot work with are
refused; without an ``ipcv`` key nothing changes; InternVL's own format refuses a data-parallel encoder. What every
family must do is in ``test_vllm_families.py``."""

from __future__ import annotations

import itertools
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# A submodule: without vLLM, ``import vllm`` alone would find tests/vllm (a namespace package).
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (tests/vllm run in their own environment)")

from PIL import Image

import ipcv_kernels as ik
import ipcv_kernels.vllm as ikv
from ipcv_kernels.families import is_vllm_model
from ipcv_kernels.testing import assert_close
from ipcv_kernels.vllm.testing import ENGINE, shutdown_engine

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}
CONFIG = ik.IPCVConfig(**SETTINGS)
PROMPT = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8"
VIDEO_PROMPT = "w5 w6 <|vision_start|><|video_pad|><|vision_end|> w7 w8"
_fresh = itertools.count(100)  # every check gets new pixels / images (vLLM caches encodings)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(model=checkpoint("qwen2_vl"), hf_overrides={"ipcv": SETTINGS}, **ENGINE)
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(checkpoint("qwen2_vl"), dtype=torch.float32).eval()


@pytest.fixture
def with_config(llm):
    """``set(config)`` patches the running engine's model (``None``: unpatched); the plugin's
    setting is back afterwards."""

    def set_config(config):
        llm.apply_model(lambda m: ikv.remove_ipcv(m) if config is None else ikv.apply_ipcv(m, config))

    yield set_config
    set_config(CONFIG)


def test_get_ipcv_patch_is_none_when_unpatched(llm, with_config):
    with_config(None)
    assert llm.apply_model(ik.get_ipcv_patch) == [None]


def random_image(height, width):
    generator = np.random.default_rng(next(_fresh))
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_generate_with_a_video_equals_transformers(llm, hf_model, checkpoint):
    """A request carrying a video (frames ``uint8 [T, H, W, 3]``) through vLLM's processor and
    ``generate``: the video's embeddings inside ``generate`` equal the patched transformers
    tower's on the same video through transformers' processor, the tokens equal its greedy
    tokens, and the video's tokens are pruned. (The tiny model's tokens barely depend on the
    embeddings, so the embeddings are what shows the video went through IPCV alike.)"""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    video = np.random.default_rng(next(_fresh)).integers(0, 256, (4, 16, 24, 3), dtype=np.uint8)
    request = {
        "prompt": VIDEO_PROMPT,
        "multi_modal_data": {"video": video},
        "multi_modal_uuids": {"video": [f"v{next(_fresh)}"]},
    }
    encoded = []
    (hook,) = llm.apply_model(
        lambda m: m.visual.register_forward_hook(lambda module, args, out: encoded.append(out.clone()))
    )
    try:
        (output,) = llm.generate(request, SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    finally:
        hook.remove()
    (tokens,) = llm.apply_model(lambda m: ik.get_ipcv_patch(m).last_tokens_per_block)

    inputs = AutoProcessor.from_pretrained(checkpoint("qwen2_vl"))(
        text=[VIDEO_PROMPT], videos=[video], return_tensors="pt"
    )
    with ik.ipcv_applied(hf_model, CONFIG), torch.no_grad():
        expected_embeddings = hf_model.model.visual(
            inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"]
        ).pooler_output
        expected = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert len(encoded) == 1  # one encoder call, the video's
    assert_close(encoded[0], expected_embeddings)
    prompt = inputs["input_ids"][0].tolist()
    assert list(output.prompt_token_ids) == prompt  # the same placeholders for the video
    assert list(output.outputs[0].token_ids) == expected[0, len(prompt) :].tolist()
    ((t, h, w),) = inputs["video_grid_thw"].tolist()
    assert t > 1  # frames were paired, not dropped
    assert tokens[: CONFIG.prune_layer] == [t * h * w] * CONFIG.prune_layer
    assert all(count < t * h * w for count in tokens[CONFIG.prune_layer :])


def test_bad_request_does_not_take_the_engine_down(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    params = SamplingParams(max_tokens=3, temperature=0.0)
    with pytest.raises((ValueError, TypeError, VLLMValidationError)):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": "not an image"}}, params, use_tqdm=False)
    request = {"prompt": PROMPT, "multi_modal_data": {"image": random_image(16, 16)}}
    assert len(llm.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids) == 3


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_invalid_ipcv_dict_fails_when_the_engine_config_is_built(checkpoint):
    """Refused by ``create_engine_config`` in the caller's process (no engine is started), the
    error itself naming the field (the server's refusal: ``test_vllm_serve.py``)."""
    from vllm import LLM

    with pytest.raises(ValueError, match=r"^hf_overrides\['ipcv'\]: ratio must be in \[0, 1\), got 1.5$") as raised:
        LLM(model=checkpoint("qwen2_vl"), hf_overrides={"ipcv": {"ratio": 1.5}}, **ENGINE)
    assert raised.traceback[-1].name == "check_settings"


def test_a_minicpmv_prune_layer_before_its_merge_fails_when_the_engine_config_is_built(checkpoint):
    """MiniCPM-V merges 2 x 2 tokens inside its tower after block ``insert_layer_id`` (0 in the tiny
    checkpoint): a prune layer before ``insert_layer_id + 2`` is refused from the model's
    configuration in the caller's process, before any engine starts, naming the field (spec §5.14;
    the model build refuses it too, ``check_config``)."""
    from vllm import LLM

    with pytest.raises(ValueError, match=r"^hf_overrides\['ipcv'\]: prune_layer must be >= insert_layer_id \+ 2 = 2 "):
        LLM(model=checkpoint("minicpmv"), hf_overrides={"ipcv": {"prune_layer": 1}}, **ENGINE)


def fake_engine_config(ipcv, architectures=("Qwen2VLForConditionalGeneration",), **compilation):
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(ipcv=ipcv, architectures=list(architectures))),
        compilation_config=SimpleNamespace(**compilation),
    )


@pytest.mark.parametrize(
    "ipcv, architectures, error, message",
    [
        ({"ratio": 1.5}, None, ValueError, "ratio"),
        ({"num_neighbours": 3}, None, TypeError, "num_neighbours"),
        ({"as_layers": "7"}, None, TypeError, "as_layers"),
        ({"scope": "tile"}, None, ValueError, "scope"),
        ({"selection": "no_such_selector"}, None, ValueError, "no_such_selector"),
        ([("ratio", 0.5)], None, TypeError, "must be a dict"),
        ({"ratio": 0.5}, ["MllamaForConditionalGeneration"], ValueError, "MllamaForConditionalGeneration"),
    ],
)
def test_check_settings_refuses_before_any_model(ipcv, architectures, error, message):
    config = fake_engine_config(ipcv, *([architectures] if architectures else []))
    with pytest.raises(error, match=message):
        ikv.plugin.check_settings(config)


def test_check_settings_takes_the_family_recommendation_and_engine_settings():
    internvl = ["InternVLForConditionalGeneration"]
    assert ikv.plugin.check_settings(fake_engine_config({"ratio": 0.3}, internvl)) == ik.IPCVConfig(
        prune_layer=7, ratio=0.3, as_layers=3, num_neighbors=10
    )
    assert ikv.plugin.check_settings(fake_engine_config(None)) is None
    with pytest.raises(ValueError, match="compile_mm_encoder"):
        ikv.plugin.check_settings(fake_engine_config({}, compile_mm_encoder=True))


def test_register_wraps_create_engine_config_once():
    from vllm.engine.arg_utils import EngineArgs

    wrapped = EngineArgs.create_engine_config
    ikv.register()
    assert EngineArgs.create_engine_config is wrapped  # idempotent
    assert wrapped.__wrapped__.__qualname__ == "EngineArgs.create_engine_config"


def test_data_parallel_encoder_is_refused_for_intern_vit(checkpoint):
    """``mm_encoder_tp_mode="data"`` makes ``InternVisionModel`` shard its tiles across the ranks
    inside one tower call: refused at engine start, naming the setting."""
    from vllm import LLM

    with pytest.raises(Exception) as raised:
        LLM(
            model=checkpoint("internvl_chat"),
            trust_remote_code=True,
            hf_overrides={"ipcv": SETTINGS},
            mm_encoder_tp_mode="data",
            **ENGINE,
        )
    assert any(
        isinstance(e, ValueError) and "IPCV" in str(e) and "mm_encoder_tp_mode" in str(e) for e in _chain(raised.value)
    )


def fake_vllm_config(ipcv, **compilation):
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(ipcv=ipcv)),
        compilation_config=SimpleNamespace(**compilation),
    )


@pytest.mark.parametrize(
    "ipcv, error, field",
    [
        ({"ratio": 1.5}, ValueError, "ratio"),
        ({"prune_layer": 99}, ValueError, "prune_layer"),
        ({"num_neighbours": 3}, TypeError, "num_neighbours"),
        ({"as_layers": "7"}, TypeError, "as_layers"),
        ([("ratio", 0.5)], TypeError, "ipcv"),
    ],
)
def test_invalid_settings_name_the_field(llm, ipcv, error, field):
    def apply(model):
        with pytest.raises(error, match=field):
            ikv.plugin.apply_from_config(model, fake_vllm_config(ipcv))
        return ik.get_ipcv_patch(model).config  # the model keeps its patch

    assert llm.apply_model(apply) == [CONFIG]


@pytest.mark.parametrize("setting", ["compile_mm_encoder", "cudagraph_mm_encoder"])
def test_compiled_or_graphed_encoder_is_refused(llm, setting):
    def apply(model):
        with pytest.raises(ValueError, match=setting):
            ikv.plugin.apply_from_config(model, fake_vllm_config(SETTINGS, **{setting: True}))

    llm.apply_model(apply)


def test_without_ipcv_key_nothing_changes(llm):
    def apply(model):
        return ikv.plugin.apply_from_config(model, fake_vllm_config(None)), ik.get_ipcv_patch(model).config

    assert llm.apply_model(apply) == [(None, CONFIG)]


def test_transformers_models_are_not_vllm_models(hf_model):
    assert not is_vllm_model(hf_model)
    with pytest.raises(TypeError, match="vLLM model"):
        ikv.apply_ipcv(hf_model, CONFIG)


def test_an_intern_vit_layer_without_what_the_adapter_uses_is_refused(checkpoint):
    """A vLLM whose InternViT layer lacks what the adapter goes through (here the QK norm
    method) is refused when the patch is made, naming what is missing: never a failure deep
    inside the first forward."""
    from vllm import LLM

    with pytest.MonkeyPatch.context() as patched:
        from vllm.model_executor.models.intern_vit import InternParallelAttention

        patched.delattr(InternParallelAttention, "_apply_qk_norm")
        with pytest.raises(Exception) as raised:
            LLM(model=checkpoint("internvl_chat"), trust_remote_code=True, hf_overrides={"ipcv": SETTINGS}, **ENGINE)
    assert any(isinstance(e, TypeError) and "_apply_qk_norm" in str(e) for e in _chain(raised.value))


@pytest.mark.parametrize(
    "version, inside", [("0.32.0", True), ("0.33.0", True), ("0.34.0+cpu", True), ("0.31.2", False), ("0.35.0", False)]
)
def test_versions_outside_the_checked_range_warn(version, inside):
    from ipcv_kernels.vllm.compat import check_vllm_version

    if inside:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_vllm_version(version)
    else:
        with pytest.warns(RuntimeWarning, match=f"this is vLLM {re.escape(version)}"):
            assert not check_vllm_version(version)


def test_the_running_vllm_is_in_the_checked_range():
    from ipcv_kernels.vllm.compat import check_vllm_version

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_vllm_version()


def test_a_qwen_block_with_another_signature_is_refused_when_patching(llm):
    """A vLLM whose Qwen2-VL block takes the rotary table under another name (as vLLM 0.11 did,
    ``rotary_pos_emb``) is refused when the patch is made, naming the missing parameters."""
    from vllm.model_executor.models.qwen2_vl import Qwen2VisionBlock

    def old_forward(self, x, cu_seqlens, rotary_pos_emb, max_seqlen=None):
        raise AssertionError("never called")

    def apply(model):
        with pytest.MonkeyPatch.context() as patched:
            patched.setattr(Qwen2VisionBlock, "forward", old_forward)
            with pytest.raises(TypeError, match=r"lacks .*rotary_pos_emb_cos=.*rotary_pos_emb_sin=.*vLLM 0\.32\.0"):
                ikv.apply_ipcv(model, CONFIG)
        return ik.get_ipcv_patch(model).config  # the model keeps its patch

    assert llm.apply_model(apply) == [CONFIG]
