"""The evaluation entry point: request runner, model-argument parsing, and the lmms-eval plugin.

The model is a tiny random Qwen2-VL saved to disk and loaded back by the runner. Its processor is
assembled here from a real tokenizer and Qwen2-VL's PIL image processor: transformers' own
``Qwen2VLProcessor`` cannot be built without torchvision, which this machine does not have; the
tiny Qwen2.5-VL and Qwen3-VL share its layout and processor. The other families get their real
processors, with word-level tokenizers and PIL image processors (LLaVA-OneVision's and SmolVLM's
with their video processors unchecked, InternVL's without one, see ``unchecked_video_processor``).
Every family answers one request through the one plugin model ``ipcv``. The
lmms-eval tests run when lmms-eval is importable (``pip install --no-deps lmms-eval pytz loguru``
is enough for them) and skip otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ipcv_kernels import DART, FastV, IPCVConfig, apply_ipcv, get_llm_pruning_patch
from ipcv_kernels.eval import MultimodalRunner, build_settings
from ipcv_kernels.models import get_ipcv_patch
from ipcv_kernels.testing.models import TINY_SPECIAL_TOKENS, build_qwen2_vl_model

WORDS = ["<unk>", "<pad>", "<eos>", "system", "user", "assistant", "you", "are", "a", "helpful"]
WORDS += ["what", "is", "this", "?", "describe", "it", ".", "cat", "dog", "yes", "no"]
SPECIALS = {
    "<|image_pad|>": TINY_SPECIAL_TOKENS["image_token_id"],
    "<|video_pad|>": TINY_SPECIAL_TOKENS["video_token_id"],
    "<|vision_start|>": TINY_SPECIAL_TOKENS["vision_start_token_id"],
    "<|vision_end|>": TINY_SPECIAL_TOKENS["vision_end_token_id"],
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
IPCV = IPCVConfig(prune_layer=2, ratio=0.5, as_layers=2, num_neighbors=3)


class TinyQwen2VLProcessor:
    """What ``Qwen2VLProcessor`` does, for images: chat template, one ``<|image_pad|>`` per merged
    patch, tokenisation with left padding, ``mm_token_type_ids``."""

    chat_template = CHAT_TEMPLATE

    def __init__(self) -> None:
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

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(
            messages, chat_template=CHAT_TEMPLATE, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, text, images=None, videos=None, padding=True, return_tensors="pt"):
        assert videos is None
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

    def batch_decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2_vl")
    build_qwen2_vl_model().save_pretrained(folder)
    return str(folder)


def test_runner_loads_patches_and_answers(checkpoint):
    runner = MultimodalRunner.from_pretrained(
        checkpoint,
        ipcv_config=IPCV,
        llm_pruner=DART(layer=2, ratio=0.5, pivot_image_tokens=2, pivot_text_tokens=2),
        device="cpu",
        dtype="float32",
        processor=TinyQwen2VLProcessor(),
        max_new_tokens=3,
    )
    assert get_ipcv_patch(runner.model).config == IPCV
    contexts, visuals = ["what is this ?", "describe it ."], [[image(16, 16, 0)], [image(8, 12, 1)]]
    answers = runner.generate(contexts, visuals, {"until": ["\n"]})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # 16 and 6 image tokens; the longer row drops 8 of its 16, the shorter 3 of 6 plus 5 padding.
    length = runner.encode([runner.prompt(c, v) for c, v in zip(contexts, visuals, strict=True)], visuals)[
        "input_ids"
    ].shape[1]
    assert get_llm_pruning_patch(runner.model).last_kept.shape == (2, length - 8)

    logprob, greedy = runner.loglikelihood("is this a cat ?", " yes", [image(16, 16, 0)])
    assert logprob < 0 and isinstance(greedy, bool)


def test_runner_baseline_is_unpatched(checkpoint):
    runner = MultimodalRunner.from_pretrained(
        checkpoint, device="cpu", dtype="float32", processor=TinyQwen2VLProcessor(), max_new_tokens=2
    )
    assert get_ipcv_patch(runner.model) is None and get_llm_pruning_patch(runner.model) is None
    assert len(runner.generate(["what is this ?"], [[image(16, 16, 0)]])) == 1


def test_build_settings_parses_model_arguments():
    config, pruner = build_settings(ipcv_ratio="0.5", ipcv_prune_layer="2", llm_pruner="DART", llm_ratio=0.6)
    assert config == IPCVConfig(prune_layer=2, ratio=0.5)
    assert pruner == DART(layer=2, ratio=0.6)
    assert build_settings(ipcv=False, llm_pruner="fastv", llm_layer=3) == (None, FastV(layer=3))
    assert build_settings(ipcv="false") == (None, None)
    config, _ = build_settings(ipcv_ops_backend="torch", ipcv_attention_backend="sdpa")
    assert (config.ops_backend, config.attention_backend) == ("torch", "sdpa")
    with pytest.raises(ValueError, match="llm_pruner"):
        build_settings(llm_pruner="sparsevlm")
    with pytest.raises(ValueError, match="ipcv"):
        build_settings(ipcv="maybe")
    with pytest.raises(ValueError, match="ratio"):
        build_settings(llm_pruner="fastv", llm_ratio="1.5")
    with pytest.raises(ValueError, match="llm_layer"):
        build_settings(llm_pruner="fastv", llm_layer="two")


def test_lmms_eval_loads_the_plugin_and_answers(checkpoint):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from ipcv_kernels.eval.lmms_eval_model import IPCVModel

    model_class = get_model("ipcv_qwen2_vl")  # found through the package's entry point
    assert model_class is IPCVModel
    arguments = (
        f"pretrained={checkpoint},dtype=float32,max_new_tokens=3,ipcv_prune_layer=2,ipcv_ratio=0.5,"
        "ipcv_as_layers=2,ipcv_num_neighbors=3,llm_pruner=fastv,llm_layer=2,llm_ratio=0.5"
    )
    lm = model_class.create_from_arg_string(
        arguments, {"batch_size": 1, "device": "cpu", "processor": TinyQwen2VLProcessor()}
    )
    assert get_llm_pruning_patch(lm.model).pruner == FastV(layer=2, ratio=0.5)
    lm.task_dict = {"toy": {"test": {0: {"image": image(16, 16, 0), "answer": " yes"}}}}

    def request(kind, arguments):
        return Instance(kind, arguments, idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})

    def visuals(doc):
        return [doc["image"]]

    generated = lm.generate_until(
        [request("generate_until", ("what is this ?", {"until": ["."]}, visuals, 0, "toy", "test"))]
    )
    assert len(generated) == 1 and isinstance(generated[0], str)
    scored = lm.loglikelihood(
        [request("loglikelihood", ("is this a cat ?", lambda doc: doc["answer"], visuals, 0, "toy", "test"))]
    )
    assert len(scored) == 1 and scored[0][0] < 0
    assert torch.is_tensor(get_llm_pruning_patch(lm.model).last_kept)


# -- one plugin model for every family ------------------------------------------------------------

CLIP_WORDS = ["<unk>", "<pad>", "<eos>", "<bos>", "user", "system", "assistant", "what", "is", "this", "?", "a", "cat"]
CLIP_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def clip_family_processor(family: str):
    """A real transformers processor of ``family`` for the tiny models: a word-level tokenizer
    (image token id 260, as in ``ipcv_kernels.testing.models``) and the family's PIL image
    processor at 32 x 32."""
    from transformers import Gemma3Processor, LlavaNextProcessor, LlavaProcessor, PaliGemmaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

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


def allow_smolvlm_processor(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SmolVLMProcessor`` refuses to build without num2words (not installed here), which it
    calls for video prompts only, to spell out frame counts: give it ``str`` for the test."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        monkeypatch.setattr(processing_smolvlm, "num2words", str)


def crop_family_processor(family: str):
    """A real transformers processor of LLaVA-OneVision, Idefics3 or SmolVLM for the tiny models
    (``ipcv_kernels.testing.models``): a word-level tokenizer with the family's special tokens
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

    from ipcv_kernels.testing.models import CLIP_FAMILY_IMAGE_TOKEN, IDEFICS3_TOKENS_PER_SUB_IMAGE, ONEVISION_PINPOINTS

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


def internvl_processor():
    """transformers' ``InternVLProcessor`` for the tiny InternVL (16 x 16 tiles, up to 4 plus the
    thumbnail, the tokenizer of ``ipcv_kernels.vllm.testing`` with InternVL's named image tokens),
    without a video processor (transformers' InternVL one imports torchvision, not installed here;
    these tests send images only)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ipcv_kernels.vllm import testing

    size = {"height": testing.INTERNVL_TILE, "width": testing.INTERNVL_TILE}
    return unchecked_video_processor(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(
            size=size, crop_to_patches=True, min_patches=1, max_patches=testing.INTERNVL_MAX_TILES
        ),
        tokenizer=testing.build_tokenizer(testing.INTERNVL_SPECIAL_TOKENS, testing.INTERNVL_NAMED_TOKENS),
        video_processor=None,
        image_seq_length=testing.INTERNVL_TOKENS_PER_TILE,
        chat_template=CLIP_TEMPLATE.replace("IMAGE", "<IMG_CONTEXT>"),
    )


CLIP_FAMILIES = ["llava", "llava_next", "gemma3", "paligemma"]
# Qwen2.5-VL's and Qwen3-VL's tiny models share Qwen2-VL's patch, merge and image-token layout.
QWEN_FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
FAMILIES = [*QWEN_FAMILIES, "internvl", *CLIP_FAMILIES, "llava_onevision", "idefics3", "smolvlm"]


def family_processor(family: str, monkeypatch: pytest.MonkeyPatch):
    """The processor of a tiny model of ``family`` (one of ``FAMILIES``)."""
    if family in QWEN_FAMILIES:
        return TinyQwen2VLProcessor()
    if family == "internvl":
        return internvl_processor()
    if family in CLIP_FAMILIES:
        return clip_family_processor(family)
    if family == "smolvlm":
        allow_smolvlm_processor(monkeypatch)
    return crop_family_processor(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_batches_prompts_of_every_family(family, monkeypatch):
    """Two prompts with an image each, of different sizes, answered in one batch: the images
    reach the processor nested per prompt (a flat list gives Gemma 3's and SmolVLM's processors
    every image for the first prompt) and the pruned prefill keeps rows for both."""
    from ipcv_kernels.testing.models import build_model

    model = apply_ipcv(build_model(family), llm_pruner=FastV(layer=1, ratio=0.5))
    runner = MultimodalRunner(model, family_processor(family, monkeypatch), system_prompt="", max_new_tokens=2)
    answers = runner.generate(["what is this ?", "is this a cat ?"], [[image(40, 56, 0)], [image(24, 64, 1)]])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert get_llm_pruning_patch(model).last_kept.shape[0] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_lmms_eval_plugin_answers_for_every_family(family, tmp_path, monkeypatch):
    """The one plugin model loads a tiny checkpoint of each family (found through the family
    table), with IPCV in its tower and FastV in its decoder, and answers one request."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from ipcv_kernels.eval.lmms_eval_model import IPCVModel
    from ipcv_kernels.testing.models import build_model

    build_model(family).save_pretrained(tmp_path)
    processor = family_processor(family, monkeypatch)
    model_class = get_model("ipcv")
    assert model_class is IPCVModel and get_model("ipcv_qwen2_vl") is IPCVModel
    arguments = (
        f"pretrained={tmp_path},dtype=float32,max_new_tokens=3,system_prompt=,ipcv_prune_layer=2,ipcv_ratio=0.5,"
        "ipcv_as_layers=1,ipcv_num_neighbors=3,llm_pruner=fastv,llm_layer=1,llm_ratio=0.5"
    )
    lm = model_class.create_from_arg_string(arguments, {"batch_size": 1, "device": "cpu", "processor": processor})
    assert get_ipcv_patch(lm.model).config == IPCVConfig(prune_layer=2, ratio=0.5, as_layers=1, num_neighbors=3)
    lm.task_dict = {"toy": {"test": {0: {"image": image(40, 56, 0)}}}}
    request = Instance(
        "generate_until",
        ("what is this ?", {"until": ["."]}, lambda doc: [doc["image"]], 0, "toy", "test"),
        idx=0,
        metadata={"task": "toy", "doc_id": 0, "repeats": 1},
    )
    answers = lm.generate_until([request])
    assert len(answers) == 1 and isinstance(answers[0], str)
    kept = get_llm_pruning_patch(lm.model).last_kept  # the prefill was pruned
    assert kept is not None and kept.shape[0] == 1
