"""Tiny checkpoints that both vLLM and transformers load: saved seeded random weights, a local
word-level tokenizer and the image processor's settings (no downloads).

``vllm.LLM(load_format="dummy")`` gives every request the same output, so the vLLM tests and the
benchmark save real (seeded random) weights instead: vLLM and transformers then load the same
weights, and their vision embeddings can be compared. The vocabulary is ``w3 .. w119`` plus the
Qwen2-VL special tokens at the ids of ``ipcv_kernels.testing.models.TINY_SPECIAL_TOKENS``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._validation import check_int
from ..testing.models import (
    INTERNVL_IMAGE_TOKEN,
    INTERNVL_TOKENS_PER_TILE,
    TINY_SPECIAL_TOKENS,
    TINY_TEXT,
    TINY_VISION,
    build_model,
)

# vLLM's CPU attention backend takes head sizes of 32 and more: 2 heads of 32 (TINY_TEXT's 12 is
# too small); mrope sections add up to half the head size.
VLLM_TEXT = {
    **TINY_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
}
SPECIAL_TOKENS = {
    "<|image_pad|>": TINY_SPECIAL_TOKENS["image_token_id"],
    "<|video_pad|>": TINY_SPECIAL_TOKENS["video_token_id"],
    "<|vision_start|>": TINY_SPECIAL_TOKENS["vision_start_token_id"],
    "<|vision_end|>": TINY_SPECIAL_TOKENS["vision_end_token_id"],
}
# The engine settings of the vLLM tests and benchmark (the list: fp32, eager, no prefix
# caching, no processor cache, so every image is processed and encoded anew).
ENGINE: dict[str, Any] = dict(
    dtype="float32",
    enforce_eager=True,
    enable_prefix_caching=False,
    mm_processor_cache_gb=0,
    max_model_len=512,
    max_num_seqs=4,
    seed=0,
    limit_mm_per_prompt={"image": 4, "video": 1},
)
# The image processor's resize bounds (pixels): small images stay small (factor 4 = patch 2 x merge 2).
MIN_PIXELS, MAX_PIXELS = 4 * 4, 64 * 64


# InternVL (transformers' native format): its processor reads the image tokens from the
# tokenizer's named special tokens (``tokenizer.start_image_token`` ...), at the ids 120 .. 123.
INTERNVL_SPECIAL_TOKENS = {
    "<IMG_CONTEXT>": INTERNVL_IMAGE_TOKEN,
    "<img>": INTERNVL_IMAGE_TOKEN + 1,
    "</img>": INTERNVL_IMAGE_TOKEN + 2,
    "<video>": INTERNVL_IMAGE_TOKEN + 3,
}
INTERNVL_NAMED_TOKENS = {
    "context_image_token": "<IMG_CONTEXT>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}


def build_tokenizer(special_tokens: dict[str, int] | None = None, named_tokens: dict[str, str] | None = None) -> Any:
    """A ``PreTrainedTokenizerFast``: whitespace-split words ``w3 .. w119``, the special tokens
    ``special_tokens`` (token -> id in 120 .. 123, default ``SPECIAL_TOKENS``; split out of the text
    without spaces), ``<pad>`` 0 (also the unknown token), ``<s>`` 1, ``</s>`` 2.

    ``named_tokens``: attribute name -> special token, exposed as ``tokenizer.<name>`` and
    ``tokenizer.<name>_id`` (what InternVL's processor reads).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_tokens = SPECIAL_TOKENS if special_tokens is None else special_tokens
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 120)}, **special_tokens}
    vocab.update({f"<unused{i}>": i for i in range(124, TINY_TEXT["vocab_size"])})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<pad>",
        extra_special_tokens=named_tokens or {},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


# Qwen2.5-VL: windows of 2 x 2 merge units, full attention in blocks 2 and 5.
QWEN2_5_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=VLLM_TEXT["hidden_size"],
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=8,
    fullatt_block_indexes=[2, 5],
)


# Qwen3-VL: a Qwen3 decoder (head size 32, interleaved mrope) and a tower with position embeddings
# on an 8 x 8 grid and DeepStack taps after blocks 1, 3 and 4 (inside and after the pruned stretch
# of the tests' prune layer 2).
QWEN3_TEXT = {
    **VLLM_TEXT,
    "head_dim": 32,
    "rope_parameters": {**VLLM_TEXT["rope_parameters"], "mrope_interleaved": True},
}
QWEN3_VISION = dict(
    depth=6,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=VLLM_TEXT["hidden_size"],
    patch_size=2,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=[1, 3, 4],
)
# family -> (transformers class prefix, text config, vision config, the vision field holding the
# merger's output width: always the language model's ``hidden_size``)
CHECKPOINTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "qwen2_vl": ("Qwen2VL", VLLM_TEXT, TINY_VISION, "hidden_size"),
    "qwen2_5_vl": ("Qwen2_5_VL", VLLM_TEXT, QWEN2_5_VISION, "out_hidden_size"),
    "qwen3_vl": ("Qwen3VL", QWEN3_TEXT, QWEN3_VISION, "out_hidden_size"),
}


# InternVL's tiles: 16 x 16 pixels (the tiny tower's image size), at most 4 per image plus the
# thumbnail; vLLM's CPU attention needs a decoder head size of 32.
INTERNVL_TILE = 16
INTERNVL_MAX_TILES = 4
INTERNVL_TEXT_OVERRIDES = {
    key: VLLM_TEXT[key]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
}
FAMILIES = (*CHECKPOINTS, "internvl")


def build_checkpoint(
    path: str | Path,
    family: str = "qwen2_vl",
    *,
    seed: int = 0,
    vision: Mapping[str, Any] | None = None,
    text: Mapping[str, Any] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Path:
    """Save a tiny ``family`` model (one of ``FAMILIES``: fp32 seeded random weights, tokenizer,
    image (and Qwen3-VL / InternVL video) processor settings) under ``path``; return the directory.

    Args:
        vision: vision-config fields replacing the tiny tower's (e.g. the 7B tower's widths at a
            reduced depth for the vLLM benchmark); the merger's output width (``hidden_size`` /
            ``out_hidden_size``) always stays the language model's. Qwen families only.
        text: language-model config fields replacing the tiny decoder's (e.g. a larger
            ``max_position_embeddings`` for prompts with large images). Qwen families only.
        max_pixels: the image processor's upper bound on an image's pixels (larger images are
            shrunk to it); the default keeps the tests' images small. Qwen families only.

    Loadable by ``vllm.LLM(model=path)`` and by transformers' ``from_pretrained(path)``.
    InternVL is transformers' native format (``InternVLForConditionalGeneration``; vLLM builds
    its ``InternS1ForConditionalGeneration`` for it), the tiny model of
    ``ipcv_kernels.testing.models.build_model`` with a decoder vLLM's CPU attention takes.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path)
    for name, fields in (("vision", vision), ("text", text)):
        if fields is not None and not isinstance(fields, Mapping):
            raise TypeError(f"{name} must be a mapping of config fields, got {type(fields).__name__}")
    check_int("max_pixels", max_pixels, low=MIN_PIXELS)
    if family == "internvl":
        if vision or text or max_pixels != MAX_PIXELS:
            raise ValueError("vision, text and max_pixels apply to the Qwen families only, not to internvl")
        return _build_internvl(path, seed)
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    prefix, base_text, base_vision, output = CHECKPOINTS[family]
    text = {**base_text, **(text or {})}
    vision = {**base_vision, **(vision or {}), output: text["hidden_size"]}
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, **TINY_SPECIAL_TOKENS)
    config.architectures = [f"{prefix}ForConditionalGeneration"]
    torch.manual_seed(seed)
    getattr(transformers, f"{prefix}ForConditionalGeneration")(config).to(torch.float32).eval().save_pretrained(path)
    sizes = dict(
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"],
    )
    Qwen2VLImageProcessorPil(**sizes, min_pixels=MIN_PIXELS, max_pixels=max_pixels).save_pretrained(path)
    if family == "qwen3_vl":  # its processor also loads a video processor (Qwen2-VL's takes defaults)
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        Qwen3VLVideoProcessor(**sizes, size={"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}).save_pretrained(
            path
        )
    build_tokenizer().save_pretrained(path)
    return path


def _build_internvl(path: Path, seed: int) -> Path:
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    model = build_model("internvl", seed=seed, text_overrides=INTERNVL_TEXT_OVERRIDES)
    model.config.architectures = ["InternVLForConditionalGeneration"]
    # transformers ties InternVL's output embeddings by default, vLLM's decoder reads the text
    # config (untied): save an output layer of its own. Tied, the tiny decoder repeats the prompt's
    # last token whatever the image, and ``generate`` tests would check nothing.
    model.config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(model.lm_head.weight.shape, generator=generator) * model.config.text_config.initializer_range
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(path)
    size = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            size=size, crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES
        ),
        tokenizer=build_tokenizer(INTERNVL_SPECIAL_TOKENS, INTERNVL_NAMED_TOKENS),
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
    ).save_pretrained(path)
    return path


_TORCHVISION_SCHEMAS: list[Any] = []  # the library fragment must stay alive


def define_torchvision_op_schemas() -> None:
    """Let PyPI's CPU-incompatible torchvision import next to CPU torch (call before importing it).

    PyPI's torchvision 0.28.0 matches torch 2.13 but is a CUDA build: its compiled ops
    (``torchvision/_C.so``) cannot load next to the CPU wheel, which torchvision tolerates, except
    that ``torchvision._meta_registrations`` registers fake kernels for ``torchvision::nms`` and
    ``torchvision::qnms`` unconditionally (``operator torchvision::nms does not exist``). Defining
    those two schemas (no kernels) lets it import; its transforms are pure PyTorch, which is all
    transformers' Qwen2-VL image and video processors use. Calling ``nms`` then raises. A no-op
    once defined, without torchvision, or when torchvision's ops load (a matching build).

    vLLM imports torchvision in subprocesses too (its model inspection), so the vLLM test
    environment runs this at every interpreter start: ``.ci/run`` writes a ``.pth`` file doing so.
    """
    if _TORCHVISION_SCHEMAS:
        return
    spec = importlib.util.find_spec("torchvision")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return
    try:  # what torchvision's import does first; succeeds for a matching build
        torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))
        return
    except (OSError, ImportError):
        pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.append(library)
