"""The public patching API of Hugging Face models: ``apply_ipcv`` / ``remove_ipcv`` /
``ipcv_applied``, the installed patches, and per-call hints (``set_tiles_per_image``).

The model's family, tower and language model are found through the family table
(``ipcv_kernels.families``); the family's adapter tells the engine (``ipcv_kernels.engine``) where
its blocks, items, segments and rotary tables live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .config import IPCVConfig
from .engine import IPCVPatch
from .families import (
    is_sglang_model,
    is_vllm_model,
    locate,
    no_language_model,
    recommended_config,
    sglang_ipcv_patch,
    supported_classes,
    vllm_ipcv_patch,
)
from .llm import LLMPruner, LLMPruningPatch
from .models.idefics3 import Idefics3Adapter
from .models.internvl import InternVLAdapter


def apply_ipcv(model: nn.Module, config: IPCVConfig | None = None, *, llm_pruner: LLMPruner | None = None) -> nn.Module:
    """Patch ``model`` in place with IPCV in its vision tower and/or an LLM-side pruner; return it.

    Args:
        model: a supported Hugging Face model instance: the full conditional-generation model, the
            base model, or the vision tower itself (see ``supported_classes()``). Only this
            instance is patched; other instances of the class are untouched.
        config: IPCV settings. ``None`` means ``recommended_config(model)`` (the family's
            recommended setting: the paper's Qwen2-VL-7B one for the Qwen families, prune layer 7 /
            3 stabilisation blocks for InternVL) when ``llm_pruner`` is ``None`` too, and no
            vision-side IPCV when a pruner is given.
        llm_pruner: an LLM-side pruner (``FastV``, ``DART``) for the language model, or ``None``.
            Needs a model with a language model (not a bare tower). See ``ipcv_kernels.llm``.

    The tower keeps its output types and shapes: every dropped token is restored before its
    merger. Applying to an already patched model replaces the previous patches: afterwards the
    model carries exactly what this call describes. Patches stack with other libraries' wrappers
    of the same modules (see ``ipcv_kernels.engine.patching``), and a patched model is as
    re-entrant as the unpatched one: concurrent forwards (threads) never share per-call state.

    While patched, the tower's ``output_hidden_states`` of blocks ``P .. depth-2`` and its
    ``output_attentions`` hold the kept rows only, and ``output_attentions`` has no entry for the
    attention-stabilisation blocks (their attention is computed by ``ngr_attention``, which
    returns no weights); the final output is always complete.

    Raises:
        TypeError: unsupported model, ``config`` not an ``IPCVConfig``, ``llm_pruner`` not an
            ``LLMPruner``, or a pruner for a model without a language model, for a family whose
            row refuses it (``HFClasses.llm_refusal``), or whose decoder has layers other than
            standard attention (Qwen3.5's linear-attention layers).
        ValueError: ``config.prune_layer`` outside ``[1, depth)`` of this tower, or
            ``llm_pruner.layer`` outside ``[1, num_hidden_layers)`` of the language model.
    """
    found = locate(model)
    if config is None and llm_pruner is None:
        config = IPCVConfig(**found.family.recommended)
    if config is not None and not isinstance(config, IPCVConfig):
        raise TypeError(f"config must be an IPCVConfig, got {type(config).__name__}")
    if llm_pruner is not None and not isinstance(llm_pruner, LLMPruner):
        raise TypeError(f"llm_pruner must be an LLMPruner (FastV, DART), got {type(llm_pruner).__name__}")
    if llm_pruner is not None and found.text_model is None:
        raise no_language_model(model)
    if llm_pruner is not None and found.family.hf.llm_refusal is not None:
        raise TypeError(f"llm_pruner: not supported on {found.family.name}: {found.family.hf.llm_refusal}")
    # Validate both sides (layer ranges included) before touching the model.
    patch = IPCVPatch(found.tower, found.family.hf.adapter(model), config) if config is not None else None
    llm_patch = None
    if llm_pruner is not None:
        llm_patch = LLMPruningPatch(found.multimodal, found.text_model, llm_pruner, found.token_ids)
    for installed in (found.ipcv_patch, found.llm_patch):  # replaced: the model carries what this call says
        if installed is not None:
            installed.remove()
    if patch is not None:
        patch.install()
    if llm_patch is not None:
        llm_patch.install()
    return model


def remove_ipcv(model: nn.Module) -> nn.Module:
    """Undo ``apply_ipcv`` on ``model``, both sides (a no-op if it is not patched); return it."""
    found = locate(model)
    for installed in (found.ipcv_patch, found.llm_patch):
        if installed is not None:
            installed.remove()
    return model


@contextlib.contextmanager
def ipcv_applied(
    model: nn.Module, config: IPCVConfig | None = None, *, llm_pruner: LLMPruner | None = None
) -> Iterator[nn.Module]:
    """``with ipcv_applied(model, config): ...``: ``apply_ipcv`` on entry, ``remove_ipcv`` on exit
    (also when the body raises). Same arguments as ``apply_ipcv``."""
    apply_ipcv(model, config, llm_pruner=llm_pruner)
    try:
        yield model
    finally:
        remove_ipcv(model)


def get_ipcv_patch(model: nn.Module) -> IPCVPatch | None:
    """The installed patch (``config``, ``last_tokens_per_block``) of ``model``'s tower, if any.

    vLLM models (what ``LLM.apply_model`` hands its function) and SGLang models (``runner.model``)
    are looked up by their framework's classes in the family table: ``None`` when unpatched or
    unsupported, never an exception.
    """
    if is_vllm_model(model):
        return vllm_ipcv_patch(model)
    if is_sglang_model(model):
        return sglang_ipcv_patch(model)
    return locate(model).ipcv_patch


def get_llm_pruning_patch(model: nn.Module) -> LLMPruningPatch | None:
    """The installed LLM-side patch (``pruner``, ``last_kept``) of ``model``, if any (``None`` for
    a model without a language model, or of no supported family)."""
    try:
        found = locate(model)
    except TypeError:
        return None
    return found.llm_patch


def set_tiles_per_image(model: nn.Module, tiles_per_image: Sequence[int] | None) -> None:
    """Tell a patched InternVL or Idefics3 / SmolVLM model or tower how many consecutive tiles
    (sub-images) each image of its calls has; the tiles of one image form one IPCV item.

    - InternVL: for direct tower calls. A bare tower otherwise treats all tiles of a call as one
      item (calls through the full model read the counts from ``input_ids``).
    - Idefics3 / SmolVLM: the counts cover the call's real sub-images in order, overriding the
      defaults (each prompt's sub-images in a full model, each sub-image in a bare tower call).
      Needed when a prompt holds several images, since the call gives no boundaries between
      them; inside a full model the counts must split each prompt's real sub-images exactly.

    The setting stays until changed, cleared with ``None`` or the patch removed; each call checks
    that the counts add up to its number of tiles (``ValueError`` otherwise).

    Raises:
        TypeError: ``model`` is not a patched InternVL / Idefics3 / SmolVLM model or tower, or bad
            counts.
    """
    found = locate(model)
    patch = found.ipcv_patch
    if patch is None or not isinstance(patch.adapter, (InternVLAdapter, Idefics3Adapter)):
        raise TypeError(
            f"model must be an InternVL, Idefics3 or SmolVLM model or tower patched with apply_ipcv, "
            f"got a {found.family.name} one"
        )
    if tiles_per_image is not None:
        tiles_per_image = list(tiles_per_image)
        if not all(isinstance(count, int) and not isinstance(count, bool) and count >= 1 for count in tiles_per_image):
            raise TypeError(f"tiles_per_image must be positive ints, got {tiles_per_image!r}")
    patch.adapter.tiles_per_image = tiles_per_image


__all__ = [
    "apply_ipcv",
    "get_ipcv_patch",
    "get_llm_pruning_patch",
    "ipcv_applied",
    "recommended_config",
    "remove_ipcv",
    "set_tiles_per_image",
    "supported_classes",
]
