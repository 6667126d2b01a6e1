"""Processors (tokenizer, image processor, chat template) of the tiny models of every family, as a
serving or evaluation stack uses them: the family table's ``TinyModel.processor``.

Tokenizers are word-level (no vocabulary files to download) with each family's special tokens at
the ids its tiny model's config uses; image processors are transformers' PIL ones (no torchvision)
configured for the tiny towers' patch and tile sizes. transformers' ``Qwen2VLProcessor`` needs
torchvision, so the Qwen families get ``TinyQwen2VLProcessor``, which does what it does for images.
"""

from __future__ import annotations

from typing import Any

from .models import (
    CLIP_FAMILY_IMAGE_TOKEN,
    IDEFICS3_TOKENS_PER_SUB_IMAGE,
    INTERNVL_IMAGE_TOKEN,
    INTERNVL_TOKENS_PER_TILE,
    LLAMA4_IMAGE_MARK,
    LLAMA4_TILE_X,
    LLAMA4_TILE_Y,
    LLAMA4_TOKENS,
    LLAMA4_TOKENS_PER_TILE,
    LLAMA4_VISION,
    MISTRAL3_BREAK_TOKEN,
    MISTRAL3_END_TOKEN,
    MISTRAL3_IMAGE_TOKEN,
    ONEVISION_PINPOINTS,
    PIXTRAL_VISION,
    TINY_SPECIAL_TOKENS,
    TINY_TEXT,
    llama4_image_processor,
)

# The Qwen families' vision tokens (``build_tokenizer``'s default).
SPECIAL_TOKENS = {
    "<|image_pad|>": TINY_SPECIAL_TOKENS["image_token_id"],
    "<|video_pad|>": TINY_SPECIAL_TOKENS["video_token_id"],
    "<|vision_start|>": TINY_SPECIAL_TOKENS["vision_start_token_id"],
    "<|vision_end|>": TINY_SPECIAL_TOKENS["vision_end_token_id"],
}
# InternVL (transformers' native format): its processor reads the image tokens from the
# tokenizer's named special tokens (``tokenizer.start_image_token`` ...), at the ids 120 .. 123.
INTERNVL_SPECIAL_TOKENS = {
    "<IMG_CONTEXT>": INTERNVL_IMAGE_TOKEN,
    "<img>": INTERNVL_IMAGE_TOKEN + 1,
    "</img>": INTERNVL_IMAGE_TOKEN + 2,
    "<video>": INTERNVL_IMAGE_TOKEN + 3,
}
# InternVL's own (OpenGVLab) format: vLLM's processor writes ``<img> <IMG_CONTEXT> * n </img>``
# for each ``<image>`` of a prompt and ``Frame1: <img> <|video_pad|> * n </img> ...`` for a
# ``<video>`` (a Qwen2 language model's video token).
INTERNVL_CHAT_SPECIAL_TOKENS = {
    **INTERNVL_SPECIAL_TOKENS,
    "<image>": INTERNVL_IMAGE_TOKEN + 4,
    "<|video_pad|>": INTERNVL_IMAGE_TOKEN + 5,
}
INTERNVL_NAMED_TOKENS = {
    "context_image_token": "<IMG_CONTEXT>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}


def build_tokenizer(special_tokens: dict[str, int] | None = None, named_tokens: dict[str, str] | None = None) -> Any:
    """A ``PreTrainedTokenizerFast``: whitespace-split words ``w3 .. w119``, the special tokens
    ``special_tokens`` (token -> id in 120 .. 127, default ``SPECIAL_TOKENS``; split out of the text
    without spaces; free ids there are ``<unusedN>``), ``<pad>`` 0 (also the unknown token), ``<s>`` 1, ``</s>`` 2.

    ``named_tokens``: attribute name -> special token, exposed as ``tokenizer.<name>`` and
    ``tokenizer.<name>_id`` (what InternVL's processor reads).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_tokens = SPECIAL_TOKENS if special_tokens is None else special_tokens
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 120)}, **special_tokens}
    taken = set(special_tokens.values())
    vocab.update({f"<unused{i}>": i for i in range(120, TINY_TEXT["vocab_size"]) if i not in taken})
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


# InternVL's tiles: 16 x 16 pixels (the tiny tower's image size), at most 4 per image plus the
# thumbnail.
INTERNVL_TILE = 16
INTERNVL_MAX_TILES = 4


# -- the Qwen families ---------------------------------------------------------------------------
WORDS = ["<unk>", "<pad>", "<eos>", "system", "user", "assistant", "you", "are", "a", "helpful"]
WORDS += ["what", "is", "this", "?", "describe", "it", ".", "cat", "dog", "yes", "no"]
SPECIALS = {
    **SPECIAL_TOKENS,
    "<|im_start|>": 124,
    "<|im_end|>": 125,
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyQwen2VLProcessor:
    """What ``Qwen2VLProcessor`` does, for images: chat template, one ``<|image_pad|>`` per merged
    patch, tokenisation with left padding, ``mm_token_type_ids``."""

    chat_template = CHAT_TEMPLATE

    def __init__(self) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vocab = {word: i for i, word in enumerate(WORDS)} | SPECIALS
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
        )
        self.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=1024
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=CHAT_TEMPLATE, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def __call__(
        self, text: list[str], images: Any = None, videos: Any = None, padding: bool = True, return_tensors: str = "pt"
    ) -> dict[str, Any]:
        if videos is not None:
            raise ValueError("videos: TinyQwen2VLProcessor takes images only")
        features = {}
        if images:
            features = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = iter((features["image_grid_thw"].prod(-1) // 4).tolist())
            text = [
                "".join(
                    part + ("<|image_pad|>" * next(counts) if i < t.count("<|image_pad|>") else "")
                    for i, part in enumerate(t.split("<|image_pad|>"))
                )
                for t in text
            ]
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        image_id = SPECIALS["<|image_pad|>"]
        return {
            **encoded,
            **features,
            "mm_token_type_ids": (encoded["input_ids"] == image_id).long(),
        }

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


# -- CLIP / SigLIP families, InternVL ---------------------------------------------------------------
CLIP_WORDS = ["<unk>", "<pad>", "<eos>", "<bos>", "user", "system", "assistant", "what", "is", "this", "?", "a", "cat"]
CLIP_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def clip_family_processor(family: str) -> Any:
    """A real transformers processor of ``family`` for the tiny models: a word-level tokenizer
    (image token id 260, as in ``ipcv_kernels.testing.models``) and the family's PIL image
    processor at 32 x 32."""
    from transformers import Gemma3Processor, LlavaNextProcessor, LlavaProcessor, PaliGemmaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    Tokenizer, models, pre_tokenizers, PreTrainedTokenizerFast = _tokenizer_classes()
    image_token = {"gemma3": "<image_soft>"}.get(family, "<image>")
    specials = {image_token: 260, "<boi>": 261, "<eoi>": 262}
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CLIP_WORDS)} | specials, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"image_token": image_token, "boi_token": "<boi>", "eoi_token": "<eoi>"} if family == "gemma3" else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        extra_special_tokens=extra,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    size = {"height": 32, "width": 32}
    template = CLIP_TEMPLATE.replace("IMAGE", {"gemma3": "<boi>"}.get(family, "<image>"))
    clip = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava":
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=size)
        return LlavaProcessor(image_processor=processor, tokenizer=tokenizer, chat_template=template, **clip)
    if family == "llava_next":
        processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size=size, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]]
        )
        return LlavaNextProcessor(image_processor=processor, tokenizer=tokenizer, chat_template=template, **clip)
    if family == "gemma3":
        processor = Gemma3ImageProcessorPil(size=size)
        return Gemma3Processor(
            image_processor=processor, tokenizer=tokenizer, chat_template=template, image_seq_length=4
        )
    processor = SiglipImageProcessorPil(size=size)
    processor.image_seq_length = 16
    return PaliGemmaProcessor(image_processor=processor, tokenizer=tokenizer)  # no chat template


def unchecked_video_processor(processor_class: type) -> type:
    """``processor_class`` that keeps its video processor without checking its class: transformers
    checks it against a class that needs torchvision, which is not installed here (the video
    processor itself builds without it, and these tests send images only)."""

    class UncheckedVideoProcessor(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in processor_class.get_attributes() if name != "video_processor"]

        def __init__(self, *, video_processor: Any, **kwargs: Any) -> None:
            super().__init__(video_processor=video_processor, **kwargs)
            self.video_processor = video_processor  # SmolVLM's chat template reads its frame settings

    return UncheckedVideoProcessor


def _allow_smolvlm_processor() -> None:
    """``SmolVLMProcessor`` refuses to build without num2words, which it calls for video prompts
    only, to spell out frame counts: where num2words is not installed, ``str`` stands in (these
    processors are for image prompts)."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = str


def _tokenizer_classes() -> tuple[Any, Any, Any, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    return Tokenizer, models, pre_tokenizers, PreTrainedTokenizerFast


def crop_family_processor(family: str) -> Any:
    """A real transformers processor of LLaVA-OneVision, Idefics3 or SmolVLM for the tiny models
    (``ipcv_kernels.families.build_model``): a word-level tokenizer with the family's special tokens
    (``<image>`` id 260, then OneVision's ``<video>`` or Idefics3's ``<fake_token_around_image>``,
    ``<global-img>``, ``<end_of_utterance>`` and the 36 ``<row_i_col_j>`` tags, all below the
    vocabulary size 300) and the family's PIL image processor: OneVision 32 x 32 crops on its
    anyres grids, Idefics3 / SmolVLM 32 x 32 sub-images of images resized to at most 64 px."""
    from transformers import Idefics3Processor, LlavaOnevisionProcessor, SmolVLMProcessor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    Tokenizer, models, pre_tokenizers, PreTrainedTokenizerFast = _tokenizer_classes()
    image_id = CLIP_FAMILY_IMAGE_TOKEN
    if family == "llava_onevision":
        specials = {"<image>": image_id, "<video>": image_id + 1}
    else:
        specials = {"<image>": image_id, "<fake_token_around_image>": image_id + 1, "<global-img>": image_id + 2}
        specials["<end_of_utterance>"] = image_id + 3
        specials |= {f"<row_{i + 1}_col_{j + 1}>": image_id + 4 + 6 * i + j for i in range(6) for j in range(6)}
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CLIP_WORDS)} | specials, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    template = CLIP_TEMPLATE.replace("IMAGE", "<image>")
    if family == "llava_onevision":
        processor = LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=ONEVISION_PINPOINTS
        )
        return unchecked_video_processor(LlavaOnevisionProcessor)(
            image_processor=processor,
            tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(),
            num_image_tokens=16,  # per 32 x 32 crop: SigLIP's 4 x 4 patches, no CLS
            vision_feature_select_strategy="full",
            chat_template=template,
        )
    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    if family == "smolvlm":
        _allow_smolvlm_processor()
    if family == "idefics3":
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessorPil(**sizes),
            tokenizer=tokenizer,
            image_seq_len=IDEFICS3_TOKENS_PER_SUB_IMAGE,
            chat_template=template,
        )
    return unchecked_video_processor(SmolVLMProcessor)(
        image_processor=SmolVLMImageProcessorPil(**sizes),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=IDEFICS3_TOKENS_PER_SUB_IMAGE,
        chat_template=template,
    )


def internvl_processor() -> Any:
    """transformers' ``InternVLProcessor`` for the tiny InternVL (16 x 16 tiles, up to 4 plus the
    thumbnail, ``build_tokenizer`` with InternVL's named image tokens),
    without a video processor (transformers' InternVL one imports torchvision, not installed here;
    these tests send images only)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    size = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    return unchecked_video_processor(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(
            size=size, crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES
        ),
        tokenizer=build_tokenizer(INTERNVL_SPECIAL_TOKENS, INTERNVL_NAMED_TOKENS),
        video_processor=None,
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        chat_template=CLIP_TEMPLATE.replace("IMAGE", "<IMG_CONTEXT>"),
    )


def qwen_processor() -> TinyQwen2VLProcessor:
    """The tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models' processor (they share the layout)."""
    return TinyQwen2VLProcessor()


class ProcessorUnavailable(ImportError):
    """A family's processor cannot be built with this transformers (e.g. it imports torchvision)."""


def gemma4_processor() -> Any:
    """transformers' ``Gemma4Processor`` for the tiny Gemma 4: a word-level tokenizer with Gemma 4's
    image tokens (``<image>`` 260, ``<boi>`` 261, ``<eoi>`` 262, at the tiny config's ids) and its
    PIL image processor (4-pixel patches pooled 2 x 2, a 70-soft-token budget); no audio feature
    extractor and no video processor (transformers' imports torchvision; these tests send images)."""
    try:
        from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    except ImportError as error:  # transformers 5.17's imports its torchvision image processor
        raise ProcessorUnavailable(f"Gemma 4's processor cannot be imported here ({error})") from error

    from .models import GEMMA4_VISION, gemma4_image_processor

    Tokenizer, models, pre_tokenizers, PreTrainedTokenizerFast = _tokenizer_classes()
    image_id = CLIP_FAMILY_IMAGE_TOKEN
    specials = {"<image>": image_id, "<boi>": image_id + 1, "<eoi>": image_id + 2, "<|video|>": image_id + 3}
    specials |= {"<boa>": image_id + 4, "<eoa>": image_id + 5, "<audio>": image_id + 6}
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CLIP_WORDS)} | specials, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        extra_special_tokens={
            "image_token": "<image>",
            "boi_token": "<boi>",
            "eoi_token": "<eoi>",
            # Audio tokens: the processor checks they exist (no audio is ever sent).
            "audio_token": "<audio>",
            "boa_token": "<boa>",
            "eoa_token": "<eoa>",
        },
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})

    class VisionConfig:  # the image processor reads the patch sizes only
        patch_size = GEMMA4_VISION["patch_size"]
        pooling_kernel_size = GEMMA4_VISION["pooling_kernel_size"]

    return _image_only(Gemma4Processor)(
        image_processor=gemma4_image_processor(VisionConfig),
        tokenizer=tokenizer,
        chat_template=CLIP_TEMPLATE.replace("IMAGE", "<image>"),
        image_seq_length=70,
    )


def _image_only(processor_class: type) -> type:
    """Gemma 4's ``processor_class`` with an image processor and a tokenizer only: its ``__init__``
    sets the token attributes it sets (audio and video ones unused), then ``ProcessorMixin``'s."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str, image_seq_length: int) -> None:
            self.image_seq_length = image_seq_length
            self.image_token_id = tokenizer.image_token_id
            self.boi_token, self.eoi_token, self.image_token = (
                tokenizer.boi_token,
                tokenizer.eoi_token,
                tokenizer.image_token,
            )
            self.video_token = "<|video|>"
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.audio_seq_length, self.audio_ms_per_token = 0, 40
            self.audio_token, self.boa_token, self.eoa_token = (
                tokenizer.audio_token,
                tokenizer.boa_token,
                tokenizer.eoa_token,
            )
            self.audio_token_id = tokenizer.audio_token_id
            ProcessorMixin.__init__(
                self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
            )

    return ImageOnlyProcessor


# -- Kimi-K2.5 ---------------------------------------------------------------------------------------
class TinyKimiK25ImageProcessor:
    """What ``Kimi_K25ImageProcessor`` does (it needs torchvision, not installed here), for a
    tower's patch size: images resized to multiples of ``2 * patch_size`` (Qwen2-VL's PIL resize
    with merge size 2), normalised, cut into patches ``[n, 3, p, p]``, each image row-major, and
    ``image_grid_thw`` rows ``(1, h, w)``."""

    def __init__(self, patch_size: int, *, min_pixels: int | None = None, max_pixels: int = 1 << 40) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        unit = 2 * patch_size
        self.patch_size = patch_size
        self.merge_size = 2
        self.temporal_patch_size = 4  # frames per video chunk (one ``grid_thw`` row each)
        self.qwen = Qwen2VLImageProcessorPil(
            patch_size=patch_size,
            merge_size=2,
            temporal_patch_size=1,
            size={"shortest_edge": min_pixels or unit * unit, "longest_edge": max_pixels},
        )

    def __call__(self, images: Any, return_tensors: str = "pt", **kwargs: Any) -> dict[str, Any]:
        import torch

        from ..selectors import merge_unit_grid

        features = self.qwen(images=images, return_tensors="pt")
        grid = features["image_grid_thw"]
        # Qwen lays every image out in 2 x 2 merge units; Kimi row-major: reorder each image's rows.
        position = merge_unit_grid(grid.tolist(), 2)
        sizes = grid.prod(-1).tolist()
        order, first = [], 0
        for (_, _, w), rows in zip(grid.tolist(), position.split(sizes), strict=True):
            order.append(first + torch.argsort(rows[:, 1] * w + rows[:, 2]))
            first += rows.shape[0]
        p = self.patch_size
        pixels = features["pixel_values"][torch.cat(order)].reshape(-1, 3, p, p)
        return {"pixel_values": pixels, "image_grid_thw": grid}

    def video_patches(self, frames: list[Any]) -> tuple[Any, Any]:
        """A video as Kimi-K2.5's video processor lays it out: ``(pixels [n, 3, p, p], grid_thw
        [chunks, 3])``, chunks of ``temporal_patch_size`` (4) frames, each a ``grid_thw`` row
        (frames resized to the first one's processed size, each frame row-major)."""
        import torch

        images = [self(images=[frame]) for frame in frames]
        size = images[0]["image_grid_thw"][0]
        if any(not torch.equal(image["image_grid_thw"][0], size) for image in images):
            first = frames[0].size
            images = [self(images=[frame.resize(first)]) for frame in frames]
        pixels = [image["pixel_values"] for image in images]
        chunks = [pixels[i : i + self.temporal_patch_size] for i in range(0, len(pixels), self.temporal_patch_size)]
        grid = torch.tensor([[len(chunk), int(size[1]), int(size[2])] for chunk in chunks])
        return torch.cat(pixels), grid


class TinyKimiK25Processor(TinyQwen2VLProcessor):
    """The tiny Kimi-K2.5 model's processor: ``TinyQwen2VLProcessor``'s tokenizer and chat template
    (the vision token ids match ``ipcv_kernels.testing.models.TINY_SPECIAL_TOKENS``), one image token
    per pooled 2 x 2 window, ``TinyKimiK25ImageProcessor`` for 2-pixel patches; no
    ``mm_token_type_ids`` (Kimi's forward takes none)."""

    def __init__(self) -> None:
        super().__init__()
        self.image_processor = TinyKimiK25ImageProcessor(2, min_pixels=64, max_pixels=1024)

    def __call__(
        self, text: list[str], images: Any = None, videos: Any = None, padding: bool = True, return_tensors: str = "pt"
    ) -> dict[str, Any]:
        features = super().__call__(text, images, videos, padding, return_tensors)
        features.pop("mm_token_type_ids")
        return features


def kimi_k25_image_processor(vision_config: Any) -> Any:
    """Kimi-K2.5's image processor for the tower's patch size (a stand-in without torchvision:
    ``TinyKimiK25ImageProcessor``), at least one 2 x 2 window."""
    return TinyKimiK25ImageProcessor(vision_config.patch_size)


def kimi_k25_processor() -> TinyKimiK25Processor:
    """The tiny Kimi-K2.5 model's processor (``TinyKimiK25Processor``)."""
    return TinyKimiK25Processor()


# -- Mistral 3 --------------------------------------------------------------------------------------
MISTRAL3_SPECIALS = {
    "[IMG]": MISTRAL3_IMAGE_TOKEN,
    "[IMG_BREAK]": MISTRAL3_BREAK_TOKEN,
    "[IMG_END]": MISTRAL3_END_TOKEN,
}


def mistral3_tokenizer() -> Any:
    """The tiny Mistral 3's tokenizer: ``CLIP_WORDS`` and ``[IMG]`` / ``[IMG_BREAK]`` /
    ``[IMG_END]`` at the ids of ``ipcv_kernels.testing.models`` (260-262)."""
    Tokenizer, models, pre_tokenizers, PreTrainedTokenizerFast = _tokenizer_classes()
    vocab = {w: i for i, w in enumerate(CLIP_WORDS)} | MISTRAL3_SPECIALS
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL3_SPECIALS)})
    return tokenizer


def mistral3_image_processor() -> Any:
    """Pixtral's PIL image processor for the tiny Mistral 3: the longer side to at most 32 pixels,
    both sides rounded up to 8 (4-pixel patches merged 2 x 2), the batch zero-padded."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    unit = 2 * PIXTRAL_VISION["patch_size"]
    return PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": unit, "width": unit})


class TinyMistral3Processor:
    """What ``PixtralProcessor`` does for Mistral 3, for images: the chat template, each ``[IMG]``
    expanded to a row of ``[IMG]`` per 2 x 2 merged patches and an ``[IMG_BREAK]`` per row, the
    last one ``[IMG_END]``; tokenisation with padding. A local stand-in: transformers'
    ``PixtralProcessor`` requires torchvision, which this environment lacks (the vLLM
    environment's checkpoints save the real one)."""

    chat_template = CLIP_TEMPLATE.replace("IMAGE", "[IMG]")

    def __init__(self) -> None:
        self.tokenizer = mistral3_tokenizer()
        self.image_processor = mistral3_image_processor()
        self.unit = 2 * PIXTRAL_VISION["patch_size"]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def __call__(
        self, text: list[str], images: Any = None, padding: bool = True, return_tensors: str = "pt", **_: Any
    ) -> dict[str, Any]:
        features: dict[str, Any] = {}
        if images:
            flat = [image for row in images for image in row] if isinstance(images[0], list) else list(images)
            features = dict(self.image_processor(images=flat, return_tensors="pt"))
            sizes = iter(features["image_sizes"].tolist())
            expanded = []
            for prompt in text:
                parts = prompt.split("[IMG]")
                pieces = [parts[0]]
                for part in parts[1:]:
                    height, width = next(sizes)
                    rows, cols = height // self.unit, width // self.unit
                    run = (["[IMG]"] * cols + ["[IMG_BREAK]"]) * rows
                    run[-1] = "[IMG_END]"
                    pieces += ["".join(run), part]
                expanded.append("".join(pieces))
            text = expanded
        return {**self.tokenizer(text, padding=padding, return_tensors=return_tensors), **features}

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def mistral3_hf_processor() -> Any:
    """transformers' ``PixtralProcessor`` with ``TinyMistral3Processor``'s tokenizer, image
    processor and chat template: what a saved tiny Mistral 3 checkpoint carries for vLLM (needs
    torchvision, which vLLM's environment has)."""
    from transformers import PixtralProcessor

    return PixtralProcessor(
        image_processor=mistral3_image_processor(),
        tokenizer=mistral3_tokenizer(),
        patch_size=PIXTRAL_VISION["patch_size"],
        spatial_merge_size=2,
        chat_template=TinyMistral3Processor.chat_template,
    )


def mistral3_processor() -> TinyMistral3Processor:
    """The tiny Mistral 3's processor (``TinyMistral3Processor``)."""
    return TinyMistral3Processor()


# -- LLaVA-OneVision-1.5 ---------------------------------------------------------------------------
class TinyOnevision15Processor(TinyQwen2VLProcessor):
    """The tiny LLaVA-OneVision-1.5 model's processor: ``TinyQwen2VLProcessor`` with patches of one
    frame (no temporal patches, as the checkpoints' processor), no ``mm_token_type_ids`` (the
    model's forward takes none)."""

    def __init__(self) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        super().__init__()
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=2, merge_size=2, temporal_patch_size=1, min_pixels=64, max_pixels=1024
        )

    def __call__(
        self, text: list[str], images: Any = None, videos: Any = None, padding: bool = True, return_tensors: str = "pt"
    ) -> dict[str, Any]:
        features = super().__call__(text, images, videos, padding, return_tensors)
        features.pop("mm_token_type_ids")
        return features


def onevision1_5_processor() -> TinyOnevision15Processor:
    """The tiny LLaVA-OneVision-1.5 model's processor (``TinyOnevision15Processor``)."""
    return TinyOnevision15Processor()


# -- MiniCPM-V 4.6 / 4.7 ------------------------------------------------------------------------------
class TinyMiniCPMVProcessor(TinyQwen2VLProcessor):
    """The tiny MiniCPM-V model's processor, a local stand-in for ``MiniCPMV4_6Processor`` (which
    needs a video processor and a tokenizer carrying MiniCPM-V's markup tokens): ``TinyQwen2VLProcessor``'s
    tokenizer and chat template (image token id 120, as ``ipcv_kernels.testing.models`` builds the
    model), transformers' own MiniCPM-V PIL image processor for 2-pixel patches (the source image
    and up to 4 crops per image, 16-pixel ``scale_resolution``), one image token per slice token
    after both 2 x 2 merges (``h w / 16``), every slice of an image in one run; no
    ``mm_token_type_ids`` (the model takes none)."""

    def __init__(self) -> None:
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

        super().__init__()
        self.image_processor = MiniCPMV4_6ImageProcessorPil(patch_size=2, scale_resolution=16, max_slice_nums=4)

    def __call__(
        self, text: list[str], images: Any = None, videos: Any = None, padding: bool = True, return_tensors: str = "pt"
    ) -> dict[str, Any]:
        if videos is not None:
            raise ValueError("videos: TinyMiniCPMVProcessor takes images only")
        features: dict[str, Any] = {}
        if images:
            flat = [image for group in images for image in group] if isinstance(images[0], list) else list(images)
            out = self.image_processor(images=flat, return_tensors="pt")
            tokens = (out["target_sizes"].prod(-1) // 16).tolist()
            per_image, first = [], 0
            for count in out["num_patches_per_image"]:
                per_image.append(sum(tokens[first : first + count]))
                first += count
            counts = iter(per_image)
            text = [
                "".join(
                    part + ("<|image_pad|>" * next(counts) if i < t.count("<|image_pad|>") else "")
                    for i, part in enumerate(t.split("<|image_pad|>"))
                )
                for t in text
            ]
            features = {"pixel_values": out["pixel_values"], "target_sizes": out["target_sizes"]}
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        return {**encoded, **features}


# The transformers version whose MiniCPM-V tower takes slices of different sizes in one call, and
# why older ones cannot (the family row's ``min_transformers``).
MINICPMV_MIXED_SLICES = (
    "5.19",
    "transformers 5.17's vit_merger reshapes a call's rows as slices of target_sizes[0]'s size, so the "
    "unpatched tower fails on a call of slices of different sizes",
)


def minicpmv_processor() -> TinyMiniCPMVProcessor:
    """The tiny MiniCPM-V model's processor (``TinyMiniCPMVProcessor``). Below transformers
    ``MINICPMV_MIXED_SLICES``' version it is unavailable: its slices differ in size (spec §5.14)."""
    import transformers
    from packaging.version import Version

    version, why = MINICPMV_MIXED_SLICES
    if Version(transformers.__version__) < Version(version):
        raise ProcessorUnavailable(f"MiniCPM-V's processor makes slices of different sizes: {why}")
    return TinyMiniCPMVProcessor()


# -- Llama 4 ----------------------------------------------------------------------------------------
LLAMA4_SPECIALS = {
    "<|patch|>": LLAMA4_TOKENS["image_token_index"],
    "<|image_start|>": LLAMA4_TOKENS["boi_token_index"],
    "<|image_end|>": LLAMA4_TOKENS["eoi_token_index"],
    "<|image|>": LLAMA4_IMAGE_MARK,
    "<|tile_x_separator|>": LLAMA4_TILE_X,
    "<|tile_y_separator|>": LLAMA4_TILE_Y,
}


class _Llama4Tiles:  # the tiny tower's tile size, as a vision config gives it
    image_size = LLAMA4_VISION["image_size"]


class TinyLlama4Processor:
    """What ``Llama4Processor`` does, for images, at the tiny Llama 4's sizes: the tiles of
    ``Llama4TileProcessor`` (16 pixels, up to 2 x 2 and a global tile); each ``<|image|>`` of the
    text expanded to ``<|image_start|>``, the tiles' ``<|patch|>`` runs with
    ``<|tile_x_separator|>`` / ``<|tile_y_separator|>``, ``<|image|>``, the global tile's run,
    ``<|image_end|>``. A local stand-in: transformers' Llama 4 image processor requires torchvision,
    which this environment lacks."""

    chat_template = CLIP_TEMPLATE.replace("IMAGE", "<|image|>")

    def __init__(self) -> None:
        Tokenizer, models, pre_tokenizers, PreTrainedTokenizerFast = _tokenizer_classes()
        vocab = {w: i for i, w in enumerate(CLIP_WORDS)} | LLAMA4_SPECIALS
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
        )
        self.tokenizer.add_special_tokens({"additional_special_tokens": list(LLAMA4_SPECIALS)})
        self.image_processor = llama4_image_processor(_Llama4Tiles)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def image_run(self, rows: int, cols: int) -> str:
        patches = "<|patch|>" * LLAMA4_TOKENS_PER_TILE
        run = "<|image_start|>"
        if rows * cols > 1:
            run += "".join("<|tile_x_separator|>".join([patches] * cols) + "<|tile_y_separator|>" for _ in range(rows))
        return run + "<|image|>" + patches + "<|image_end|>"

    def __call__(
        self, text: list[str], images: Any = None, padding: bool = True, return_tensors: str = "pt", **_: Any
    ) -> dict[str, Any]:
        import torch

        features: dict[str, Any] = {}
        if images:
            flat = [image for row in images for image in row] if isinstance(images[0], list) else list(images)
            features["pixel_values"] = torch.cat([self.image_processor.tiles(image) for image in flat])
            grids = iter(self.image_processor.grid(image) for image in flat)
            expanded = []
            for prompt in text:
                parts = prompt.split("<|image|>")
                pieces = [parts[0]]
                for part in parts[1:]:
                    pieces += [self.image_run(*next(grids)), part]
                expanded.append("".join(pieces))
            text = expanded
        return {**self.tokenizer(text, padding=padding, return_tensors=return_tensors), **features}

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def llama4_processor() -> TinyLlama4Processor:
    """The tiny Llama 4's processor (``TinyLlama4Processor``)."""
    return TinyLlama4Processor()
