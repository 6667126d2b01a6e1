"""The SGLang plugin itself: found through its entry point, hooked where SGLang's loaders build
models, inert without an ``ipcv`` key, refusing bad settings and engine settings it cannot work
with at start (naming what is wrong), and exactly reversible."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip(
    "sglang.srt.models.qwen2_vl", reason="SGLang is not installed (tests/sglang run in their own environment)"
)

import ipcv_kernels as ik
import ipcv_kernels.sglang as iks
from ipcv_kernels.sglang import plugin
from ipcv_kernels.testing import assert_close
from ipcv_kernels.vllm.testing import qwen_encoder_inputs

SETTINGS = {"prune_layer": 2, "ratio": 0.5, "as_layers": 2, "num_neighbors": 3}


def pixels_and_grid(model, seed=0):
    kwargs, pixels = qwen_encoder_inputs(model.config.vision_config, [[1, 8, 12], [1, 6, 4]], seed=seed)
    return pixels, kwargs["image_grid_thw"]


def test_the_entry_point_registers_the_hook_sglang_applies(sglang_process):
    import sglang.srt.model_loader.loader as loader
    from sglang.srt.plugins.hook_registry import HookRegistry

    (entry,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "ipcv_kernels"]
    assert entry.value == "ipcv_kernels.sglang:register"
    assert entry.load() is iks.register
    hooks = [hook for _, hook, _ in HookRegistry._hooks[plugin.HOOK_TARGET]]
    assert hooks.count(plugin.after_initialize_model) == 1
    iks.register()  # idempotent
    assert [hook for _, hook, _ in HookRegistry._hooks[plugin.HOOK_TARGET]] == hooks
    assert plugin.HOOK_TARGET in HookRegistry._patched
    assert loader._initialize_model.__wrapped__ is not None  # SGLang's wrapper around its function


def test_without_an_ipcv_key_nothing_changes(sglang_process):
    model = sglang_process("qwen2_vl")
    assert ik.get_ipcv_patch(model) is None
    assert "forward" not in vars(model.visual)
    assert not any("forward" in vars(block) for block in model.visual.blocks)


def test_the_loaded_model_is_patched_and_removal_is_exact(sglang_process):
    model = sglang_process("qwen2_vl", {"ipcv": SETTINGS})
    unpatched = sglang_process("qwen2_vl")
    patch = ik.get_ipcv_patch(model)
    assert patch is not None and patch.config == ik.IPCVConfig(**SETTINGS)
    pixels, grid = pixels_and_grid(model)
    with torch.no_grad():
        pruned = model.visual(pixels, grid_thw=grid)
        expected = unpatched.visual(pixels, grid_thw=grid)
        assert (pruned - expected).abs().max() > 1e-3  # pruning changed the output
        assert patch.last_tokens_per_block[-1] < patch.last_tokens_per_block[0]
        assert iks.remove_ipcv(model) is model
        assert ik.get_ipcv_patch(model) is None
        assert "forward" not in vars(model.visual)
        assert not any("forward" in vars(block) for block in model.visual.blocks)
        assert torch.equal(model.visual(pixels, grid_thw=grid), expected)
        iks.remove_ipcv(model)  # a no-op when unpatched


@pytest.mark.parametrize(
    ("ipcv", "error", "named"),
    [
        ({"ratio": 1.5}, ValueError, "ratio"),
        ({"prune_layer": 99}, ValueError, "prune_layer"),
        ({"num_neighbors": 0}, ValueError, "num_neighbors"),
        ({"scope": "everything"}, ValueError, "scope"),
        ({"ratio": "half"}, TypeError, "ratio"),
        ({"bogus": 1}, TypeError, "bogus"),
        (0.5, TypeError, "ipcv"),
    ],
)
def test_bad_settings_are_refused_at_start_naming_the_field(sglang_process, ipcv, error, named):
    with pytest.raises(error, match=named):
        sglang_process("qwen2_vl", {"ipcv": ipcv})


def test_a_minicpmv_prune_layer_before_its_merge_is_refused_at_start(sglang_process):
    """MiniCPM-V merges 2 x 2 tokens inside its tower after block ``insert_layer_id`` (0 in the tiny
    checkpoint): a prune layer before ``insert_layer_id + 2`` is refused when SGLang builds the model,
    naming the field (spec §5.14)."""
    with pytest.raises(ValueError, match=r"prune_layer must be >= insert_layer_id \+ 2 = 2 "):
        sglang_process("minicpmv", {"ipcv": {"prune_layer": 1}})


def test_cuda_graphed_vision_encoder_is_refused_at_start(sglang_process, monkeypatch):
    monkeypatch.setenv("SGLANG_VIT_ENABLE_CUDA_GRAPH", "1")
    with pytest.raises(ValueError, match="SGLANG_VIT_ENABLE_CUDA_GRAPH"):
        sglang_process("qwen2_5_vl", {"ipcv": SETTINGS})
    monkeypatch.delenv("SGLANG_VIT_ENABLE_CUDA_GRAPH")
    model = sglang_process("qwen2_5_vl", {"ipcv": SETTINGS})
    model.visual.enable_cg = True  # what SGLang sets on a CUDA machine with the variable set
    with pytest.raises(ValueError, match="CUDA-graphed"):
        iks.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))


def test_flashinfer_cudnn_attention_is_refused(sglang_process, monkeypatch):
    """Its metadata holds padded offsets of the full sequence: refused at start when published
    as the multimodal attention backend, and by the block when its metadata arrives."""
    from sglang.srt.layers.attention.vision import prepare_vision_attention_metadata

    from ipcv_kernels.engine import ForwardState
    from ipcv_kernels.sglang.adapters import SGLangQwen2VLAdapter

    monkeypatch.setattr(plugin, "_mm_attention_backend", lambda: "flashinfer_cudnn")
    with pytest.raises(ValueError, match="flashinfer_cudnn"):
        sglang_process("qwen2_vl", {"ipcv": SETTINGS})
    monkeypatch.undo()
    cu_seqlens = torch.tensor([0, 16], dtype=torch.int32)
    metadata = prepare_vision_attention_metadata(cu_seqlens, torch.device("cpu"), packed_indptrs=cu_seqlens)
    state = ForwardState(cu_items=cu_seqlens, read_blocks=frozenset({0}))
    with pytest.raises(ValueError, match="flashinfer_cudnn"):
        SGLangQwen2VLAdapter().parse_block_call(
            (), {"cu_seqlens": cu_seqlens, "position_embeddings": None, "forward_metadata": metadata}, state
        )


def test_apply_ipcv_refuses_what_it_cannot_patch(sglang_process):
    model = sglang_process("qwen2_vl")
    with pytest.raises(TypeError, match="SGLang model of a supported family"):
        iks.apply_ipcv(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="IPCVConfig"):
        iks.apply_ipcv(model, {"ratio": 0.5})
    with pytest.raises(ValueError, match="prune_layer"):
        iks.apply_ipcv(model, ik.IPCVConfig(prune_layer=6))
    assert ik.get_ipcv_patch(model) is None  # nothing was installed


def test_apply_ipcv_with_the_recommended_setting_replaces_a_patch(sglang_process):
    model = sglang_process("qwen2_vl", {"ipcv": SETTINGS})
    first = ik.get_ipcv_patch(model)
    second = iks.apply_ipcv(model)
    assert second.config == ik.recommended_config(model) == ik.IPCVConfig()
    assert ik.get_ipcv_patch(model) is second and not first.active
    pixels, grid = pixels_and_grid(model, seed=1)
    with torch.no_grad():
        once = model.visual(pixels, grid_thw=grid)
        iks.apply_ipcv(model, ik.IPCVConfig())
        assert_close(model.visual(pixels, grid_thw=grid), once)


def test_draft_models_and_models_without_a_tower_are_left_alone(sglang_process):
    from types import SimpleNamespace

    model = sglang_process("qwen2_vl")
    draft = SimpleNamespace(is_draft_model=True, hf_config=SimpleNamespace(ipcv={"ratio": 2.0}))
    assert plugin.after_initialize_model(model, draft) is None  # not even validated: never applied
    assert ik.get_ipcv_patch(model) is None
    model.visual = None  # what --language-only builds for the Qwen3-VL family
    assert iks.apply_from_config(model, SimpleNamespace(ipcv=SETTINGS)) is None
    with pytest.raises(ValueError, match="ratio"):  # the settings are still checked
        iks.apply_from_config(model, SimpleNamespace(ipcv={"ratio": 2.0}))
    with pytest.raises(TypeError, match="without its vision tower"):
        iks.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))


def test_internvl_data_parallel_encoder_and_graphs_are_refused(sglang_process):
    model = sglang_process("internvl_chat", {"ipcv": SETTINGS})
    model.vision_model.encoder.enable_cg = True  # what SGLang sets on a CUDA machine with the variable set
    with pytest.raises(ValueError, match="CUDA-graphed"):
        iks.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))
    model.vision_model.encoder.enable_cg = False
    model.vision_model.use_data_parallel = True  # --mm-enable-dp-encoder
    with pytest.raises(ValueError, match="mm-enable-dp-encoder"):
        iks.apply_ipcv(model, ik.IPCVConfig(**SETTINGS))
    assert ik.get_ipcv_patch(model).config == ik.IPCVConfig(**SETTINGS)  # the plugin's patch stays
