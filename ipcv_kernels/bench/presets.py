"""Benchmark suites: the defaults of one ``python -m ipcv_kernels bench`` run.

The towers they time are presets of the family table (``ipcv_kernels.families``: each row's
``presets``, real checkpoints' tower shapes with seeded random weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import IPCVConfig


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
    # 1024 and 2048 pixel images, a batch and a video.
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
