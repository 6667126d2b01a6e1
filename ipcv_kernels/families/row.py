"""What one row of the family table holds: ``Family`` and the parts it points at.

A row is keyed by one stable ``id`` (``"qwen2_vl"``, ``"llava_next"``, ...) and holds or points at
everything the package and its tools know about a model family: its Hugging Face classes and the
paths to its vision tower and language model, its vLLM architectures and SGLang classes, the adapter of each
framework, the kind of call its tower takes (which decides how items are counted and which FLOP
model counts it), its tiny test model, its real-shape presets and its recommended IPCV setting.

Nothing here imports a framework: classes are matched by name, vLLM and SGLang adapters are named
as ``"module:Class"`` and imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine import FamilyAdapter
from ..testing.models import finish, jitter


@dataclass(frozen=True)
class CallKind:
    """How a family's tower is called and what one IPCV item is (``docs/spec.md`` §4).

    name: the kind's id (``grid``, ``windows``, ``tiles``, ``crops``, ``sub_images``, ``patches``, ``images``,
        ``grid_cls``, ``frames``, ``slices``).
    items: what forms one item, in words (for docs and messages).
    takes_grid_thw: the tower takes packed patches and ``grid_thw`` rows (the Qwen towers);
        otherwise it takes images ``[B, C, S, S]`` of its fixed size ``S`` (``patches``: a padded
        batch of flattened patches ``[B, L, C p^2]`` and their positions).
    videos: the tower takes videos (frames of one video form one item).
    flops_shape: what the row's FLOP model takes after the vision config, describing a call:
        ``grid_thw`` rows, ``tiles_per_image`` counts, ``padding_per_image`` (per sub-image,
        padding patches), or ``patches_per_image`` (per image, ``(padded length, real patches)``).
    frame_cls: a ``grid_thw`` tower that prepends a CLS row to every image and video frame before
        its blocks (pinned; LLaVA-OneVision-1.5's RICE-ViT).
    """

    name: str
    items: str
    takes_grid_thw: bool
    videos: bool
    flops_shape: str
    frame_cls: bool = False


GRID = CallKind("grid", "an image, or a video, given as one grid_thw row", True, True, "grid_thw")
WINDOWS = CallKind(
    "windows", "an image or video (one grid_thw row), attending per window in most blocks", True, True, "grid_thw"
)
TILES = CallKind("tiles", "all tiles of one image, each tile's CLS token pinned", False, False, "tiles_per_image")
CROPS = CallKind(
    "crops", "all crops of one image (anyres), the CLS token pinned where the tower has one", False, False,
    "tiles_per_image",
)  # fmt: skip
SUB_IMAGES = CallKind(
    "sub_images", "all sub-images of one image, padding patches pinned and never keys", False, False,
    "padding_per_image",
)  # fmt: skip
PATCHES = CallKind(
    "patches", "an image (or video frame): one row of a padded batch of patches with positions, padding "
    "patches pinned and never keys", False, False, "patches_per_image",
)  # fmt: skip
IMAGES = CallKind(
    "images", "an image at its own resolution (a padded batch with image_sizes), one attention segment", False,
    False, "grid_thw",
)  # fmt: skip
GRID_CLS = CallKind(
    "grid_cls", "an image, or a video, given as one grid_thw row; a CLS row before every frame, pinned", True, True,
    "grid_thw", frame_cls=True,
)  # fmt: skip
# GLM-4.1V: a grid tower whose model gives each video frame its own ``grid_thw`` row (its bare
# tower takes no ``t > 1`` row): a frame is an item, and a video is called as its frames.
FRAMES = CallKind(
    "frames", "an image or one video frame, each given as one grid_thw row", True, False, "grid_thw"
)  # fmt: skip
SLICES = CallKind(
    "slices", "a slice of an image (its source or one crop): one target_sizes row and attention segment, "
    "2 x 2 merged inside the tower", False, False, "grid_thw",
)  # fmt: skip
CALL_KINDS = (GRID, WINDOWS, TILES, CROPS, SUB_IMAGES, PATCHES, IMAGES, GRID_CLS, FRAMES, SLICES)


@dataclass(frozen=True)
class HFClasses:
    """The family in transformers.

    adapter: its ``FamilyAdapter`` subclass (``ipcv_kernels.models``).
    tower_classes: class names of the bare vision tower that belong to this family alone.
    towers: model classes wrapping the tower, each with the attribute path from it to the tower.
    language_models: classes holding a language model, each with the attribute path from it to
        the multimodal model whose forward receives ``input_ids`` (``""``: the class itself).
    decoder: the attribute of that multimodal model holding the decoder an LLM-side pruner
        patches (``layers``, ``norm``).
    llm_refusal: why LLM-side pruners (FastV, DART) are refused on this family's decoder
        (``apply_ipcv`` raises a ``TypeError`` with it); ``None``: they are supported.
    """

    adapter: type[FamilyAdapter]
    tower_classes: tuple[str, ...] = ()
    towers: dict[str, str] = field(default_factory=dict)
    language_models: dict[str, str] = field(default_factory=dict)
    decoder: str = "language_model"
    llm_refusal: str | None = None


@dataclass(frozen=True)
class VLLMClasses:
    """The family in vLLM.

    adapter: its ``FamilyAdapter`` subclass as ``"module:Class"`` (imported on first use: vLLM
        adapters live in ``ipcv_kernels.vllm``, which imports the table).
    architectures: vLLM model-registry names (``config.json``'s ``architectures``) whose class the
        plugin extends, each with the vLLM module defining that class (``module:Class`` where
        vLLM's class has another name than the architecture).
    towers: vLLM model classes, each with the attribute path from it to the vision tower.
    """

    adapter: str
    architectures: dict[str, str]
    towers: dict[str, str]

    def adapter_class(self) -> type[FamilyAdapter]:
        return _import_named(self.adapter)


@dataclass(frozen=True)
class SGLangClasses:
    """The family in SGLang (``sglang.srt.models.*``).

    adapter: its ``FamilyAdapter`` subclass as ``"module:Class"`` (imported on first use: SGLang
        adapters live in ``ipcv_kernels.sglang``, which imports the table).
    towers: SGLang model classes, each with the attribute path from it to the vision tower. A
        subclass (SGLang's MoE variants of a family) matches through its class hierarchy.
    """

    adapter: str
    towers: dict[str, str]

    def adapter_class(self) -> type[FamilyAdapter]:
        return _import_named(self.adapter)


def _import_named(spec: str) -> type[FamilyAdapter]:
    """The class ``spec`` (``"module:Class"``) names, importing its module now."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TinyTower:
    """A tiny vision tower of the family (``build``; ``ipcv_kernels.families.build_tower(id)``).

    module: the module under ``transformers.models`` holding both classes.
    config_class, tower_class: their names.
    vision: the config's fields.
    """

    module: str
    config_class: str
    tower_class: str
    vision: dict[str, Any]

    def classes(self) -> tuple[type, type]:
        """``(config class, tower class)``, imported now."""
        module = importlib.import_module(f"transformers.models.{self.module}")
        return getattr(module, self.config_class), getattr(module, self.tower_class)

    def build(self, *, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The tower in eval mode with seeded random weights (every parameter perturbed, so that
        zero-initialised ones, CLS tokens and position embeddings, carry values too)."""
        config_class, tower_class = self.classes()
        torch.manual_seed(seed)
        tower = tower_class(config_class(**self.vision))
        jitter(tower, seed)
        return finish(tower, attn, dtype)


@dataclass(frozen=True)
class TinyModel:
    """A tiny full model of the family (``build``; ``ipcv_kernels.families.build_model(id)``).

    config_class, model_class: names in the top-level ``transformers`` namespace.
    fields: the config's fields, given overrides of the text config.
    prompt: one prompt's model inputs ``(model, num_images, seed) -> dict`` (``input_ids``,
        ``attention_mask``, pixels, ...), each image as the model lays out its tokens.
    processor: the model's processor (tokenizer, image processor, chat template), as a serving or
        evaluation stack calls it (``ipcv_kernels.testing.processors``).
    """

    config_class: str
    model_class: str
    fields: Callable[[dict[str, Any]], dict[str, Any]]
    prompt: Callable[[nn.Module, int, int], dict[str, Any]]
    processor: Callable[[], Any]

    def build(
        self,
        *,
        attn: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        text_overrides: dict[str, Any] | None = None,
    ) -> nn.Module:
        """The conditional-generation model in eval mode with seeded random weights;
        ``text_overrides``: text-config fields to change (e.g. Gemma 3's ``num_hidden_layers``)."""
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**self.fields(text_overrides or {}))
        model = getattr(transformers, self.model_class)(config)
        jitter(model, seed)
        return finish(model, attn, dtype)


@dataclass(frozen=True)
class ModelUse:
    """How a full multimodal model calls its vision tower: what a benchmark of the tower reproduces.

    model: the full model's name, for reports.
    family: its row's id, whose recommended IPCV setting it takes (a LLaVA model's tower is a
        CLIP tower); ``None``: the tower's own family.
    feature_layer: its ``vision_feature_layer``, the ``hidden_states`` entry (or entries) it reads
        (LLaVA's -2: the output of block ``depth - 2``). The blocks after the last one read run
        neither unpatched nor with IPCV. ``None``: the tower's own output, every block.
    grid_pinpoints: anyres resolutions ``(height, width)`` in pixels (LLaVA-NeXT, OneVision): an
        image is its base crop and the tower-size crops of its best-fitting resolution, all one
        item, counted by ``image_size_to_num_patches`` of ``anyres_module`` as the model counts
        them. ``None``: an image is split into tiles of the tower's size.
    anyres_module: the module under ``transformers.models`` defining that count.
    cases: default cases (``None``: one image at the tower's size).
    """

    model: str
    family: str | None = None
    feature_layer: int | tuple[int, ...] | None = None
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    anyres_module: str = "llava_next.modeling_llava_next"
    cases: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Preset:
    """A real checkpoint's tower shape, built with seeded random weights (bench, demo, fidelity).

    vision: the vision config's fields.
    tower: the id of the row whose ``tiny_tower`` classes build it (a LLaVA preset's tower is
        CLIP's); ``None``: this row's.
    use: how the full model calls the tower (``None``: a bare tower call).
    """

    vision: dict[str, Any]
    tower: str | None = None
    use: ModelUse | None = None


@dataclass(frozen=True)
class Family:
    """One model family: one row of ``FAMILIES``.

    id: the stable key every table, tool and test uses (``"qwen2_vl"``).
    name: shown in messages and docs (``"Qwen2-VL"``).
    kind: the tower's ``CallKind``.
    flops: the FLOP model of one tower call (``ipcv_kernels.flops``): ``flops(vision_config,
        shape, config=None, **kwargs) -> FlopReport`` with ``shape`` as ``kind.flops_shape`` says.
    hf: the transformers classes (``None``: not in transformers).
    vllm: the vLLM classes (``None``: not supported in vLLM).
    sglang: the SGLang classes (``None``: not supported in SGLang).
    tiny_tower, tiny_model: the tiny test models (``ipcv_kernels.testing``).
    image_processor: the family's image processor configured for a tower's patch sizes, given its
        vision config (the fidelity tool's presets).
    presets: real-shape towers by preset name (bench, demo, fidelity).
    recommended: ``IPCVConfig`` fields recommended for the family (others take the defaults).
    recommended_source: where those numbers come from.
    min_transformers: ``(version, why)`` where the row's tiny-tower tests need a newer transformers
        than the oldest supported one (they skip with ``why`` below it); ``None``: none.
    """

    id: str
    name: str
    kind: CallKind
    flops: Callable[..., Any]
    hf: HFClasses | None = None
    vllm: VLLMClasses | None = None
    sglang: SGLangClasses | None = None
    tiny_tower: TinyTower | None = None
    tiny_model: TinyModel | None = None
    image_processor: Callable[[Any], Any] | None = None
    presets: dict[str, Preset] = field(default_factory=dict)
    recommended: dict[str, Any] = field(default_factory=dict)
    recommended_source: str = "IPCVConfig's defaults: the paper's Qwen2-VL-7B setting (P=3, r=0.65, A=7, k=10)"
    min_transformers: tuple[str, str] | None = None

    def tower_test_skip(self) -> str | None:
        """Why the row's tiny-tower tests cannot run with the installed transformers (``None``: they can)."""
        if self.min_transformers is None:
            return None
        import transformers
        from packaging.version import Version

        version, why = self.min_transformers
        if Version(transformers.__version__) >= Version(version):
            return None
        return f"{self.name} needs transformers >= {version}: {why}"

    def unavailable(self) -> str | None:
        """Why this row's transformers models cannot be built with the installed transformers (it
        lacks their module: LLaVA-OneVision-1.5 before 5.2x), else ``None``."""
        if self.tiny_tower is None and self.tiny_model is None:
            return None
        import transformers

        if self.tiny_tower is not None:
            module = f"transformers.models.{self.tiny_tower.module.partition('.')[0]}"
            if importlib.util.find_spec(module) is None:
                return f"transformers {transformers.__version__} has no {module} ({self.name})"
        if self.tiny_model is not None and not hasattr(transformers, self.tiny_model.config_class):
            return f"transformers {transformers.__version__} has no {self.tiny_model.config_class} ({self.name})"
        return None
