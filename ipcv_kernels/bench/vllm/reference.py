"""transformers on the benchmark's saved checkpoint: the reference of bench-vllm's checks, and
each case's tower call (its tokens and FLOP model), for every call kind of the family table.

The full model is loaded from the checkpoint vLLM serves (``config.json``'s architecture), its
image processor processes the same image vLLM's processor gets, and its ``get_image_features``
gives the image's embeddings as vLLM's ``embed_multimodal`` returns them (concatenated; DeepStack
taps, where the output has them, beside the merger's output along the features, as vLLM's Qwen3-VL
concatenates them). The tower's call kind (``bench.calls.tower_calls``, with the model's use of
its tower read from the checkpoint, ``towers.model_use``) says how the processed pixels form the
call's ``Case``: ``grid_thw`` rows, tiles / crops of one image, or sub-images with their padding.
Each case is one image, which every family plans as one item, so no tile hints are needed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...reference import IPCVPlan
from ..calls import Case, GridCalls, ImageCalls, PatchCalls, SliceCalls, SubImageCalls, TowerCalls, tower_calls
from ..towers import model_use


def load_model(checkpoint: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """transformers' full model of ``checkpoint`` (its ``config.json`` architecture, else the
    image-text-to-text class of its config), eval mode.

    Raises:
        ValueError: transformers has no class of that architecture (a remote-code format).
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    (architecture,) = config.architectures
    model_class = getattr(transformers, architecture, None)
    if model_class is None and type(config) in transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        # The Hub's architecture name for a model transformers names otherwise (Kimi-K2.5's
        # KimiK25ForConditionalGeneration is transformers' Kimi_K25ForConditionalGeneration).
        model_class = transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    if model_class is None:
        raise ValueError(f"model: transformers has no {architecture} class: bench-vllm compares with transformers")
    return model_class.from_pretrained(checkpoint, dtype=dtype).to(device).eval()


class Reference:
    """transformers' model, image processor and tower call convention of the checkpoint."""

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import AutoProcessor

        from ...families import find_family

        self.model = load_model(checkpoint, dtype, device)
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.image_processor = self.processor.image_processor
        _, tower = find_family(self.model)
        self.calls: TowerCalls = tower_calls(tower, model_use(checkpoint))
        self.dtype, self.device = dtype, device
        self.features_of = self.model.get_image_features
        if not named_parameters(self.features_of):
            # A full model that forwards (*args, **kwargs) to its base model (MiniCPM-V): the base's.
            self.features_of = self.model.model.get_image_features
        self.accepted = set(inspect.signature(self.features_of).parameters)

    def to(self, device: torch.device) -> None:
        """Run transformers on ``device`` from now on (the engine's)."""
        self.model.to(device)
        self.device = device

    @property
    def vision_config(self) -> Any:
        return self.calls.config

    @property
    def depth(self) -> int:
        return self.calls.depth

    def process(self, image: Any) -> dict[str, torch.Tensor]:
        """The image processor's tensors of one image (PIL)."""
        return dict(self.image_processor(images=[image], return_tensors="pt"))

    def prompt_tokens(self, image: Any) -> int:
        """Tokens of a prompt of one image (PIL) and nothing else, as the model's processor expands
        its image placeholder (``processor.image_token``) for it: the image's share of a request."""
        encoded = self.processor(text=[self.processor.image_token], images=[image], return_tensors="pt")
        return int(encoded["input_ids"].shape[-1])

    def case(self, name: str, image: Any) -> Case:
        """The tower call of one image of the case's size, as its processor makes it."""
        processed = self.process(image)
        if isinstance(self.calls, SliceCalls):  # every slice of the image (its source, its crops), in patches
            return Case(name, "image", tuple((1, int(h), int(w)) for h, w in processed["target_sizes"].tolist()))
        if isinstance(self.calls, ImageCalls):  # one image at its own (processed) size, in patches
            patch = self.calls.config.patch_size
            ((height, width),) = processed["image_sizes"].tolist()
            return Case(name, "image", ((1, int(height) // patch, int(width) // patch),))
        if isinstance(self.calls, PatchCalls):
            # One row of the processor's padded patches (its budget), the real ones positioned
            # (x, y) >= 0 in the image's top-left rectangle of rows x cols.
            positions = processed["image_position_ids"][0]
            real = positions[(positions >= 0).all(-1)]
            rows, cols = int(real[:, 1].max()) + 1, int(real[:, 0].max()) + 1
            return Case(name, "image", (), (1,), int(positions.shape[0]), ((rows, cols),))
        if isinstance(self.calls, GridCalls):
            grid = processed["image_grid_thw"].tolist()
            return Case(name, "image", tuple(tuple(int(v) for v in row) for row in grid))
        calls = self.calls
        pixels = processed["pixel_values"]
        channels = getattr(calls.config, "num_channels", 3)
        (height, width), (patch_h, patch_w) = calls.image_size, calls.patch_size
        tiles = pixels.numel() // (channels * height * width)
        if not isinstance(calls, SubImageCalls):
            return Case(name, "image", (), (tiles,), calls.tile_tokens)
        mask = processed.get("pixel_attention_mask")
        if mask is None:
            real = ((height // patch_h, width // patch_w),) * tiles
        else:
            # A patch is real where any of its pixels is (as the model counts them); the real
            # patches of a sub-image form its top-left rectangle.
            patches = mask.reshape(tiles, height // patch_h, patch_h, width // patch_w, patch_w).any(4).any(2)
            real = tuple((int(p.any(1).sum()), int(p.any(0).sum())) for p in patches)
        return Case(name, "image", (), (tiles,), calls.tile_tokens, real)

    def features(self, image: Any) -> torch.Tensor:
        """``get_image_features`` of one image as the model is patched now: ``[rows, D]`` fp32 on
        the CPU, as vLLM's ``embed_multimodal`` returns them concatenated."""
        processed = self.process(image)
        kwargs = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
            for k, v in processed.items()
            if k in self.accepted
        }
        with torch.inference_mode():
            output = self.features_of(**kwargs)
            features = output.pooler_output
            if features is None:
                # transformers releases whose get_image_features returns the tower's output
                # unprojected (Llama 4 before 5.2x, spec §5.15) project it in forward, with the
                # model's projector.
                features = self.model.multi_modal_projector(output.last_hidden_state)
        rows = concatenated(features)
        taps = getattr(output, "deepstack_features", None)
        if taps:
            rows = torch.cat([rows, *(concatenated(tap) for tap in taps)], dim=-1)
        return rows.float().cpu()

    def run(self, image: Any, config: Any, plan: IPCVPlan) -> tuple[torch.Tensor, IPCVPlan, torch.Tensor]:
        """transformers with ``apply_ipcv(config)`` on ``image``: ``(its embeddings, its own plan,
        its embeddings on ``plan`` instead of its own)``, the plan swapped through its patch's
        adapter; the model is unpatched afterwards."""
        from ...api import apply_ipcv, get_ipcv_patch, remove_ipcv

        adapter = get_ipcv_patch(apply_ipcv(self.model, config)).adapter
        try:
            plans: list[IPCVPlan] = []
            adapter.plan = recording_plans(adapter, plans)
            own = self.features(image)
            adapter.plan = lambda *args, **kwargs: plan
            on_plan = self.features(image)
            del adapter.plan
        finally:
            remove_ipcv(self.model)
        return own, plans[0], on_plan


def named_parameters(function: Callable[..., Any]) -> set[str]:
    """The parameters of ``function`` that take a name (not ``*args`` / ``**kwargs``)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {name for name, p in inspect.signature(function).parameters.items() if p.kind not in variadic}


def concatenated(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Features of one call as rows ``[rows, D]``: a tensor ``[..., D]`` or a sequence of
    per-image tensors, concatenated in order."""
    items = [features] if isinstance(features, torch.Tensor) else list(features)
    return torch.cat([item.reshape(-1, item.shape[-1]) for item in items])


def recording_plans(adapter: Any, plans: list[IPCVPlan]) -> Callable[..., IPCVPlan]:
    """A stand-in for ``adapter.plan`` (set on the adapter instance of one patch, deleted after
    use) that appends each plan it makes to ``plans``, as a plan over transformers' rows
    (``FamilyAdapter.reference_plan``: vLLM's MiniCPM-V leaves out the padding rows it adds)."""
    planner = adapter.plan

    def plan(*args: Any, **kwargs: Any) -> IPCVPlan:
        made = planner(*args, **kwargs)
        padding = kwargs["padding"] if "padding" in kwargs else (args[5] if len(args) > 5 else None)
        plans.append(adapter.reference_plan(made, padding))
        return made

    return plan
