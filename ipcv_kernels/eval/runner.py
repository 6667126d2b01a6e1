"""Answer evaluation requests with a (patched) multimodal model of any supported family: prompts,
greedy generation, log-likelihood.

Independent of any evaluation framework: ``ipcv_kernels.eval.lmms_eval_model`` adapts it to
lmms-eval. The processor is used through the methods every Hugging Face multimodal processor
has (``apply_chat_template``, ``chat_template``, ``__call__``, ``batch_decode``, ``tokenizer``); a
processor whose ``chat_template`` is ``None`` (PaliGemma's) gets the bare context, and inserts the
image tokens itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import apply_ipcv
from ..config import IPCVConfig
from ..families import find_family
from ..llm import LLMPruner

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def is_image(visual: object) -> bool:
    from PIL import Image

    return isinstance(visual, Image.Image)


class MultimodalRunner:
    """A multimodal model and its processor, answering one request or a batch at a time.

    Args:
        model: a full model of a family in ``ipcv_kernels.families`` (Qwen2-VL, Qwen2.5-VL,
            Qwen3-VL, InternVL, LLaVA 1.5, LLaVA-NeXT, LLaVA-OneVision, Gemma 3, PaliGemma,
            Idefics3, SmolVLM), patched with ``apply_ipcv`` or not.
        processor: its processor (``AutoProcessor.from_pretrained`` of the checkpoint).
        system_prompt: the system message of every prompt (``""`` for none).
        max_new_tokens: generation length when a request does not set ``max_new_tokens``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_new_tokens: int = 128,
    ) -> None:
        find_family(model)  # TypeError naming the supported classes for any other model
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row at the right end
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        ipcv_config: IPCVConfig | None = None,
        llm_pruner: LLMPruner | None = None,
        device: str | torch.device = "cuda",
        dtype: str | torch.dtype = "auto",
        attn_implementation: str = "sdpa",
        processor: Any = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **runner_kwargs: Any,
    ) -> MultimodalRunner:
        """Load a checkpoint of a supported family (a Hub id or a local folder), patch it, wrap it.

        ``ipcv_config`` / ``llm_pruner`` go to ``apply_ipcv``; with both ``None`` the model is
        left unpatched (the baseline). ``processor`` defaults to ``AutoProcessor`` of
        ``pretrained`` with the given pixel bounds (Qwen's processors read them).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation
        ).to(device)
        if ipcv_config is not None or llm_pruner is not None:
            apply_ipcv(model, ipcv_config, llm_pruner=llm_pruner)
        if processor is None:
            pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
            processor = AutoProcessor.from_pretrained(pretrained, **pixels)
        return cls(model, processor, **runner_kwargs)

    # -- prompts --------------------------------------------------------------------------------
    def messages(self, context: str, visuals: list) -> list[dict]:
        """Chat messages: the system prompt, then the visuals followed by the context text.

        A visual is a PIL image, or a video (a file path or a list of frames, as the processor
        takes it).
        """
        content = [{"type": "image"} if is_image(v) else {"type": "video"} for v in visuals]
        content.append({"type": "text", "text": context})
        # Content as a list of parts: the form every family's chat template reads.
        system = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}]
        return [*(system if self.system_prompt else []), {"role": "user", "content": content}]

    def encode(self, texts: list[str], visuals: list[list]) -> dict[str, torch.Tensor]:
        """The processor's tensors on the model's device, floating ones in the model's dtype."""
        # Images nested per prompt: given a batch's images as one flat list, Gemma 3's and SmolVLM's
        # processors take them all for the first prompt.
        images = [[v for v in row if is_image(v)] for row in visuals]
        videos = [v for row in visuals for v in row if not is_image(v)]
        media = {key: value for key, value in (("images", images), ("videos", videos)) if any(value)}
        encoded = self.processor(text=texts, **media, padding=True, return_tensors="pt")
        return {
            key: value.to(device=self.model.device, dtype=self.model.dtype if value.is_floating_point() else None)
            for key, value in encoded.items()
        }

    def prompt(self, context: str, visuals: list) -> str:
        if getattr(self.processor, "chat_template", None) is None:  # PaliGemma: the bare prompt
            return context
        return self.processor.apply_chat_template(
            self.messages(context, visuals), tokenize=False, add_generation_prompt=True
        )

    # -- requests -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, contexts: list[str], visuals: list[list], gen_kwargs: dict | None = None) -> list[str]:
        """Answers to a batch of prompts sharing ``gen_kwargs`` (lmms-eval's generation keys:
        ``until`` (str or list of stop strings), ``max_new_tokens``, ``temperature`` (0: greedy),
        ``top_p``, ``num_beams``)."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        options: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        inputs = self.encode([self.prompt(c, v) for c, v in zip(contexts, visuals, strict=True)], visuals)
        output = self.model.generate(**inputs, **options, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stops(answer, until).strip() for answer in answers]

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str, visuals: list) -> tuple[float, bool]:
        """``(log p(continuation | prompt), whether greedy decoding would produce it)``."""
        prompt = self.prompt(context, visuals)
        prompt_length = self.encode([prompt], [visuals])["input_ids"].shape[1]
        inputs = self.encode([prompt + continuation], [visuals])
        if self.model.config.model_type == "paligemma" and "token_type_ids" in inputs:
            # Its prefix (token type 0) is attended bidirectionally: the continuation is the
            # causal suffix, or each of its tokens would see the ones it is scored on.
            inputs["token_type_ids"][:, prompt_length:] = 1
        targets = inputs["input_ids"][:, prompt_length:]
        logits = self.model(**inputs).logits[:, prompt_length - 1 : -1].float()
        logprobs = logits.log_softmax(dim=-1).gather(-1, targets[..., None])
        return float(logprobs.sum()), bool((logits.argmax(dim=-1) == targets).all())


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string."""
    end = min((text.index(stop) for stop in stops if stop and stop in text), default=len(text))
    return text[:end]
