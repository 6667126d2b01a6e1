"""Named vision towers and benchmark suites.

Model presets are ``Qwen2VLVisionConfig`` fields. ``qwen2-vl-7b`` is the vision tower of
Qwen2-VL-7B-Instruct (depth 32, width 1280, 16 heads, MLP 5120 = 4 x 1280, output 3584);
``qwen2-vl-2b`` differs only in its output width (1536). ``qwen2-vl-7b-d8`` keeps the 7B block
shapes (so GEMM shapes and per-block costs are the real ones) with depth 8, so that a CPU run stays
short. ``qwen2-vl-tiny`` is for smoke tests; it keeps the 14-pixel patches so that image sizes mean
the same token counts as for the real towers.

Presets of other families are listed in ``PRESET_FAMILIES`` with the family whose vision config
their fields are: ``qwen2.5-vl-7b`` is the vision tower of Qwen2.5-VL-7B-Instruct
(``Qwen2_5_VLVisionConfig``: depth 32, width 1280, 16 heads, gated SiLU MLP 3420, RMSNorm, output
3584, attention in 112-pixel windows except in blocks 7, 15, 23 and 31).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import IPCVConfig

QWEN2_VL_7B_VISION: dict[str, Any] = dict(
    depth=32,
    embed_dim=1280,
    num_heads=16,
    mlp_ratio=4,
    hidden_size=3584,
    hidden_act="quick_gelu",
    patch_size=14,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
)

QWEN2_5_VL_7B_VISION: dict[str, Any] = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    hidden_act="silu",
    patch_size=14,
    temporal_patch_size=2,
    in_channels=3,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-vl-7b": QWEN2_VL_7B_VISION,
    "qwen2-vl-7b-d8": {**QWEN2_VL_7B_VISION, "depth": 8},
    "qwen2-vl-2b": {**QWEN2_VL_7B_VISION, "hidden_size": 1536},
    "qwen2-vl-tiny": {
        **QWEN2_VL_7B_VISION,
        "depth": 4,
        "embed_dim": 64,
        "num_heads": 4,
        "mlp_ratio": 2,
        "hidden_size": 48,
    },
    "qwen2.5-vl-7b": QWEN2_5_VL_7B_VISION,
}
# Presets that are not Qwen2-VL towers, and their family (``ipcv_kernels.models`` module name).
PRESET_FAMILIES: dict[str, str] = {"qwen2.5-vl-7b": "qwen2_5_vl"}


@dataclass(frozen=True)
class Suite:
    """Defaults of one benchmark run; every field can be overridden on the command line.

    cases: image sizes in pixels, ``HxW`` (one image), ``HxW*B`` (a batch of ``B`` images) or
    ``HxW@F`` (a video of ``F`` frames); see ``bench.vit.parse_case``.
    """

    model: str
    dtype: str
    cases: tuple[str, ...]
    ipcv: IPCVConfig
    warmup: int
    repeats: int
    description: str


SUITES: dict[str, Suite] = {
    # The CPU target: ratio 0.65, prune layer 2, 2 stabilisation blocks on 2,048 tokens (448x896).
    "cpu": Suite(
        model="qwen2-vl-7b-d8",
        dtype="float32",
        cases=("448x448", "448x896"),
        ipcv=IPCVConfig(prune_layer=2, ratio=0.65, as_layers=2),
        warmup=1,
        repeats=5,
        description="CPU, fp32, 7B block shapes at depth 8",
    ),
    # The GPU target: the paper's Qwen2-VL-7B setting at 1k / 4k / 16k tokens per image, plus the
    # issue's 1024 and 2048 pixel images, a batch and a video.
    "gpu": Suite(
        model="qwen2-vl-7b",
        dtype="bfloat16",
        cases=("448x448", "896x896", "1792x1792", "1024x1024", "2048x2048", "448x448*8", "448x448@16"),
        ipcv=IPCVConfig(prune_layer=3, ratio=0.65, as_layers=7),
        warmup=3,
        repeats=10,
        description="GPU, bf16, full Qwen2-VL-7B vision tower",
    ),
    "smoke": Suite(
        model="qwen2-vl-tiny",
        dtype="float32",
        cases=("112x112", "56x112*2", "56x56@4"),
        ipcv=IPCVConfig(prune_layer=1, ratio=0.5, as_layers=1, num_neighbors=4),
        warmup=1,
        repeats=2,
        description="tiny tower, code-path check only",
    ),
}
