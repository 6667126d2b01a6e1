"""Running SGLang's model code on the CPU without its server: what ``tests/sglang`` use.

SGLang's server cannot start on a CPU machine without a CPU build of ``sgl_kernel`` (PyPI has
none), but its models build and run there once a process has what SGLang's scheduler would set up:
a ``torch.distributed`` world (gloo), SGLang's published server arguments and its model-parallel
groups (``init_process``). Models are then built the way SGLang's workers build them, through its
model loader (``load_model``: ``ModelConfig`` with ``--json-model-override-args``,
``get_model`` → ``DefaultModelLoader.load_model`` → ``_initialize_model``, where the plugin's hook
sits) from a tiny saved checkpoint (``build_checkpoint``).

Leave ``SGLANG_USE_CPU_ENGINE`` unset: set, SGLang's imports need ``sgl_kernel``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_int
from ..families import FAMILIES as TABLE

# The families ``build_checkpoint`` saves: every row of the family table with an SGLang entry.
FAMILIES = tuple(row.id for row in TABLE if row.sglang is not None)
# Models built encoder-only (SGLang's ``--encoder-only``: the vision tower and projector, no decoder),
# by architecture: SGLang 0.5.23's DeepSeek-V3 decoder (Kimi-K2.5's) does not build on the CPU for the
# tiny checkpoint (its CPU rotary embedding takes ``deepseek_yarn`` scaling only: "Only deepseek_yarn is
# supported for CPU for now"; further than that it was not tried). IPCV only touches the tower.
ENCODER_ONLY = ("KimiK25ForConditionalGeneration",)
# SGLang's Qwen vision norms take their epsilon from the model config's top-level ``rms_norm_eps``
# (the text config's, through transformers' config); transformers' vision norms use 1e-6.
VISION_EPS = 1e-6


def build_checkpoint(
    path: str | Path,
    family: str = "qwen2_vl",
    *,
    seed: int = 0,
    vision: Mapping[str, Any] | None = None,
    text: Mapping[str, Any] | None = None,
    max_pixels: int | None = None,
) -> Path:
    """Save a tiny ``family`` model (one of ``FAMILIES``) that SGLang and transformers both load,
    with the same seeded random weights; return its directory.

    The vLLM tests' checkpoint (``ipcv_kernels.vllm.testing.build_checkpoint``; ``internvl_chat``:
    InternVL's own format, remote-code configuration, the weights of the ``internvl`` checkpoint of
    the same seed, which transformers loads; ``gemma3``: see ``_sglang_gemma3``; ``llama4``: with a
    weight index, ``_with_weight_index``) with what SGLang
    0.5.23 reads differently from the Qwen families: the text config's ``rms_norm_eps`` is 1e-6
    (SGLang's vision norms take it, transformers' are 1e-6), Qwen2-VL's vision config also carries
    ``in_chans`` (SGLang reads it; transformers 5 writes ``in_channels``) and Qwen3.5's text config
    ``full_attention_interval`` (SGLang's layer layout). Weights keep transformers' saved names, which
    SGLang's ``load_weights`` maps. ``vision``, ``text``, ``max_pixels``: as for the vLLM
    checkpoint (a real tower's widths for a benchmark, a longer context, larger images).
    """
    from ..vllm.testing import build_checkpoint as build_vllm_checkpoint

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    check_int("seed", seed, low=0)
    if family in ("internvl_chat", "gemma3", "gemma4", "mistral3", "llama4", "minicpmv", "kimi_k25"):  # as vLLM
        if vision or text or max_pixels is not None:
            raise ValueError(f"vision, text and max_pixels apply to the Qwen families only, not to {family}")
        path = build_vllm_checkpoint(path, family, seed=seed)
        if family == "llama4":
            return _with_weight_index(path)
        if family == "minicpmv":
            return _full_attention_decoder(path)
        return _sglang_gemma3(path) if family == "gemma3" else path
    if text is not None and not isinstance(text, Mapping):
        raise TypeError(f"text must be a mapping of config fields, got {type(text).__name__}")
    extra: dict[str, Any] = {} if max_pixels is None else {"max_pixels": max_pixels}
    text = {**(text or {}), "rms_norm_eps": VISION_EPS}
    path = build_vllm_checkpoint(path, family, seed=seed, vision=vision, text=text, **extra)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    vision = config["vision_config"]
    vision.setdefault("in_chans", vision.get("in_channels", 3))
    config_file.write_text(json.dumps(config, indent=2))
    return _full_attention_decoder(path) if family == "qwen3_5" else path


def _full_attention_decoder(path: Path) -> Path:
    """Qwen3.5's decoder (Qwen3.5, MiniCPM-V 4.6) as SGLang lays it out: from
    ``full_attention_interval`` (every layer full attention in these checkpoints, see the vLLM
    ones), where transformers reads ``layer_types``."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["full_attention_interval"] = 1
    config_file.write_text(json.dumps(config, indent=2))
    return path


def _with_weight_index(path: Path) -> Path:
    """The checkpoint with a ``model.safetensors.index.json`` naming where every weight is, as a sharded
    Hub checkpoint has: SGLang 0.5.23's Llama 4 builds its vision model only when that index names
    vision weights (``_has_vision_weights``; without it the model is text-only)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def _sglang_gemma3(path: Path) -> Path:
    """The vLLM tests' Gemma 3 checkpoint as SGLang 0.5.23 loads it and computes what transformers
    computes.

    - No SigLIP pooling head (``vision_use_head: false``, its weights dropped): SGLang's SigLIP has
      none (``load_weights`` fails on ``vision_tower.vision_model.head.*``), Gemma 3 never uses it
      (it reads ``last_hidden_state``) and the real checkpoints hold none.
    - The vision MLP's activation ``quick_gelu``: SGLang's ``SiglipMLP`` always applies QuickGELU
      (its default ``act_layer``; ``gemma3_mm`` passes none), whatever ``hidden_act`` says (the
      real checkpoints say ``gelu_pytorch_tanh``, so SGLang 0.5.23's Gemma 3 tower differs from
      transformers' there before any patch); with ``quick_gelu`` transformers computes what SGLang
      computes and the two can be compared.
    """
    from safetensors.torch import load_file, save_file

    weights_file = path / "model.safetensors"
    weights = {k: v for k, v in load_file(str(weights_file)).items() if ".vision_model.head." not in k}
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["vision_config"].update(vision_use_head=False, hidden_act="quick_gelu")
    config_file.write_text(json.dumps(config, indent=2))
    return path


def init_process(
    model_path: str | Path,
    *,
    tp_size: int = 1,
    rank: int = 0,
    port: int = 29611,
    mm_attention_backend: str = "sdpa",
) -> None:
    """Set this process up as one of ``tp_size`` SGLang tensor-parallel ranks on the CPU (gloo):
    ``torch.distributed``, SGLang's published server arguments (``device="cpu"``,
    ``mm_attention_backend``) and its model-parallel groups. Call once per process, before building
    a model; every rank calls it with the same ``port``. ``model_path``: a saved checkpoint (SGLang
    resolves its server arguments against the model's config).
    """
    check_int("tp_size", tp_size, low=1)
    check_int("rank", rank, low=0, high=tp_size)
    check_int("port", port, low=1024, high=65536)
    import sglang.srt.layers.rotary_embedding.base as rotary
    import sglang.srt.models.minicpmv as minicpmv
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    # Without CUDA and without SGLang's CPU engine the text model's rotary embedding would import
    # vLLM's custom ops; SGLang's CPU path is plain PyTorch.
    rotary._is_cpu = True
    # SGLang's MiniCPM-V 4.6 / 4.7 moves its merger to ``get_device()``, which raises without an
    # accelerator (SGLang's CPU engine aside): on this CPU setup, the CPU.
    minicpmv.get_device = lambda device_id=None: "cpu"
    # This process's own world: a spawned rank inherits its parent's variables, and SGLang may
    # build groups from them.
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    parallel_state.init_distributed_environment(
        world_size=tp_size,
        rank=rank,
        local_rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        backend="gloo",
    )
    # No radix cache: nothing here serves requests, and for a hybrid decoder (Qwen3.5) SGLang would
    # otherwise resolve a Mamba-state cache the CPU cannot snapshot (refused at start).
    server_args = ServerArgs(
        model_path=str(model_path),
        device="cpu",
        mm_attention_backend=mm_attention_backend,
        tp_size=tp_size,
        disable_radix_cache=True,
        # ``--enable-multimodal``: SGLang builds Llama 4's vision model only with it (its model config
        # turns multimodal off for Llama 4 and Gemma 3 by default; the model reads this setting).
        enable_multimodal=True,
    )
    reset_context()
    publish(server_args, role="test", ranks=SpawnRanks(world_rank=rank))
    get_parallel().override_permanently(world_group=parallel_state._WORLD)
    parallel_state.initialize_model_parallel(backend="gloo")  # the published widths


def shutdown_process() -> None:
    """Undo ``init_process``: SGLang's model-parallel groups and the ``torch.distributed`` world
    (so that the process exits without waiting on them)."""
    from sglang.srt.distributed import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()


def load_model(path: str | Path, *, overrides: Mapping[str, Any] | None = None, dtype: str = "float32") -> nn.Module:
    """The model of the checkpoint at ``path``, built and loaded on the CPU by SGLang's loader path
    (``get_model`` → ``DefaultModelLoader.load_model`` → ``_initialize_model`` → ``load_weights``),
    with ``overrides`` as ``--json-model-override-args`` (e.g. ``{"ipcv": {"ratio": 0.5}}``);
    encoder-only for the architectures of ``ENCODER_ONLY``."""
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader import get_model

    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping, got {type(overrides).__name__}")
    (architecture,) = json.loads((Path(path) / "config.json").read_text())["architectures"]
    model_config = ModelConfig(
        model_path=str(path),
        model_override_args=json.dumps(dict(overrides or {})),
        dtype=dtype,
        encoder_only=architecture in ENCODER_ONLY,
    )
    return get_model(
        model_config=model_config, load_config=LoadConfig(load_format="auto"), device_config=DeviceConfig("cpu")
    )


def encode_images(model: nn.Module, pixels: torch.Tensor, layout: Any, *, video: bool = False) -> torch.Tensor:
    """An SGLang model's vision features ``[tokens, D]`` of one encoder call, as its image path
    computes them.

    Qwen models: ``model.visual(pixels [n, C * T * p * p], grid_thw=layout [items, 3])`` (their
    tower call carries the items). Gemma 4: ``model.vision_tower(pixels [B, L, C p^2], layout)``
    with ``layout`` the patch positions ``[B, L, 2]``, its pooled soft tokens ``[tokens, D]``.
    InternVL, Gemma 3: ``get_image_feature`` (``get_video_feature`` for a
    ``video``) on one item per entry of ``layout`` (tiles, or frames, per image / video) holding
    its tiles (Gemma 3: crops) of ``pixels`` ``[tiles, 3, H, W]``, the level where SGLang knows the items; the
    features ``[tiles, T, D]`` are returned as ``[tiles * T, D]``. Mistral 3: ``get_image_feature``
    of one item holding the zero-padded images ``pixels`` ``[B, 3, H, W]`` and their sizes
    ``layout`` ``[B, 2]`` (one tower call), the projected features ``[tokens, D]``. MiniCPM-V:
    ``get_image_feature`` of one item per slice (as SGLang's processor makes them) of the packed
    slices ``pixels`` ``[1, C, p, n p]`` with their ``target_sizes`` ``layout`` ``[S, 2]`` (one tower
    call), the projected features ``[tokens, D]``.
    """
    from types import SimpleNamespace

    if hasattr(model, "visual"):
        return model.visual(pixels, grid_thw=layout)
    if hasattr(getattr(model, "vision_tower", None), "pooler"):  # Gemma 4: layout = patch positions
        pooled, valid = model.vision_tower(pixels, layout)
        return pooled[valid]
    if type(model).__name__ == "KimiK25ForConditionalGeneration":  # one item: patches [n, 3, p, p], grid_thws
        item = SimpleNamespace(feature=pixels, model_specific_data={"grid_thws": layout})
        return model.get_image_feature([item])
    if type(model).__name__ == "Mistral3ForConditionalGeneration":  # one item of images [B, 3, H, W], sizes
        item = SimpleNamespace(feature=pixels, image_sizes=[tuple(int(v) for v in size) for size in layout])
        return model.get_image_feature([item])
    if type(model).__name__.startswith("MiniCPMV"):  # packed slices [1, C, p, n p], target_sizes [S, 2]
        widths = (layout.prod(-1) * pixels.shape[2]).tolist()
        items = [
            SimpleNamespace(feature=[piece], tgt_size=[size], model_specific_data={}, format=None)
            for piece, size in zip(pixels[0].split(widths, dim=-1), layout, strict=True)
        ]
        return model.get_image_feature(items)

    counts = [int(count) for count in layout]
    items = [SimpleNamespace(feature=tiles) for tiles in pixels.split(counts)]
    features = (model.get_video_feature if video else model.get_image_feature)(items)
    return features.reshape(-1, features.shape[-1])


def encode_on_ranks(
    path: str | Path,
    ipcv: Mapping[str, Any],
    pixels: torch.Tensor,
    layout: Any,
    *,
    tp_size: int = 2,
    port: int = 29631,
    timeout: float = 300.0,
) -> list[dict[str, Any]]:
    """Run SGLang's tower of the checkpoint at ``path`` under ``tensor_parallel_size=tp_size`` (one
    spawned process per rank, gloo), the model built by SGLang's loader with the plugin (loaded
    through its entry point) and ``{"ipcv": ipcv}``, on ``pixels`` and ``layout`` as
    ``encode_images`` takes them (images). Returns each rank's ``{"output", "tokens", "heads"}`` and its plan's
    fields (``IPCVPlan``: ``keep``, ``drop``, ``cu_keep``, ``cu_drop``, ``neighbors``, ``cu_seqlens_kept``) (CPU tensors; ``tokens``: ``last_tokens_per_block``;
    ``heads``: the rank's attention heads), by rank.
    """
    import multiprocessing

    check_int("tp_size", tp_size, low=1)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(
            target=_rank_worker,
            args=(str(path), dict(ipcv), pixels.numpy(), np.asarray(layout), tp_size, rank, port, results),
        )
        for rank in range(tp_size)
    ]
    for worker in workers:
        worker.start()
    try:
        collected = dict(results.get(timeout=timeout) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    failures = {rank: result for rank, result in collected.items() if isinstance(result, str)}
    if failures:
        raise RuntimeError(f"tensor-parallel ranks failed: {failures}")
    # Arrays, not tensors, cross the process boundary: a tensor would be shared through a file
    # descriptor that dies with its (finished) process.
    return [
        {
            name: value if name in ("tokens", "heads") else torch.from_numpy(value)
            for name, value in collected[rank].items()
        }
        for rank in range(tp_size)
    ]


def _rank_worker(
    path: str,
    ipcv: dict[str, Any],
    pixels: Any,
    layout: Any,
    tp_size: int,
    rank: int,
    port: int,
    results: Any,
) -> None:
    """One rank of ``encode_on_ranks``: puts ``(rank, result dict)``, or ``(rank, traceback)``."""
    import traceback

    try:
        from sglang.srt.plugins import load_plugins

        from ..api import get_ipcv_patch

        torch.set_num_threads(1)
        init_process(path, tp_size=tp_size, rank=rank, port=port)
        load_plugins()
        model = load_model(path, overrides={"ipcv": ipcv}).eval()
        patch = get_ipcv_patch(model)
        recorded: list[Any] = []
        plan_of = patch.adapter.plan

        def plan(*args: Any, **kwargs: Any) -> Any:
            recorded.append(plan_of(*args, **kwargs))
            return recorded[-1]

        patch.adapter.plan = plan
        with torch.no_grad():
            output = encode_images(model, torch.from_numpy(pixels), torch.from_numpy(layout))
        (made,) = recorded
        result = {name: value.cpu().numpy() for name, value in made._asdict().items()}
        block = patch.blocks[0]
        # Qwen / InternViT: ``attn``; Pixtral: ``attention``; SigLIP, Gemma 4: ``self_attn``.
        attention = next(getattr(block, name) for name in ("attn", "attention", "self_attn") if hasattr(block, name))
        attention = getattr(attention, "attn", attention)  # InternViT's layer wraps SGLang's VisionAttention
        heads = getattr(attention, "num_attention_heads_per_partition", None) or attention.num_heads_per_partition
        extra = {"tokens": list(patch.last_tokens_per_block), "heads": heads}
        results.put((rank, {**result, "output": output.cpu().numpy(), **extra}))
        shutdown_process()
    except Exception:
        results.put((rank, traceback.format_exc()))
