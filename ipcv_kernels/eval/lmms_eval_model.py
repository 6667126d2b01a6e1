"""lmms-eval model ``ipcv``: any supported family with IPCV and an LLM-side pruner.

One model for every family: the checkpoint's class is looked up in the family table
(``ipcv_kernels.families``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA 1.5,
LLaVA-NeXT, LLaVA-OneVision, Gemma 3, PaliGemma, Idefics3, SmolVLM), and an unsupported
checkpoint raises ``TypeError``. The older name ``ipcv_qwen2_vl`` is the same model.

lmms-eval finds it through the Python entry-point group ``lmms_eval.models`` declared in
``pyproject.toml`` (no fork, no environment variable): installing ``ipcv_kernels`` next to
lmms-eval is enough. Only lmms-eval imports this module (it imports ``lmms_eval``). Example on a
real checkpoint (IPCV at the paper's Qwen2-VL-7B setting plus DART)::

    lmms-eval --model ipcv \\
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,ipcv_ratio=0.65,llm_pruner=dart,llm_layer=2,llm_ratio=0.778 \\
        --tasks mme --batch_size 1 --device cuda
    lmms-eval --model ipcv \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,system_prompt=,llm_pruner=fastv,llm_layer=2,llm_ratio=0.5 \\
        --tasks mme --batch_size 1 --device cuda

One process on one device (no accelerate data parallelism). Model arguments: ``pretrained``,
``device``, ``dtype`` (``auto``, ``bfloat16``, ...), ``attn_implementation`` (``sdpa``,
``flash_attention_2``, ``eager``), ``system_prompt`` (empty: none), ``max_new_tokens``,
``min_pixels`` / ``max_pixels`` (Qwen processors), ``batch_size``, and the settings of
``ipcv_kernels.eval.settings.build_settings``: ``ipcv`` (``false`` turns IPCV off),
``ipcv_prune_layer``, ``ipcv_ratio``, ``ipcv_as_layers``, ``ipcv_num_neighbors``, ``ipcv_scope``,
``ipcv_ops_backend``, ``ipcv_attention_backend``, ``llm_pruner`` (``none``, ``fastv``, ``dart``),
``llm_layer``, ``llm_ratio``, ``pivot_image_tokens``, ``pivot_text_tokens``, ``ipcv_selection``
(a token selector's name: ``diff``, ``norm``, ``random``, ``uniform`` or a registered one) and
``ipcv_selection_seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from torch import nn

from .runner import DEFAULT_SYSTEM_PROMPT, MultimodalRunner
from .settings import as_number, build_settings

MODEL_NAME = "ipcv"
MODEL_NAMES = (MODEL_NAME, "ipcv_qwen2_vl")  # the second: its name when it served Qwen2-VL alone


def model_manifests() -> list:
    """The entry point's payload: lmms-eval's manifests of this model, one per name."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=f"{__name__}.IPCVModel") for name in MODEL_NAMES]


def as_list(visuals: object) -> list:
    if visuals is None:
        return []
    return list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]


class IPCVModel(lmms):
    """A model of any supported family with IPCV in the vision encoder and optionally FastV / DART
    in the decoder.

    Arguments are the module's model arguments; ``max_batch_size`` is accepted because lmms-eval
    passes it, and unused. ``processor`` (an object, for programmatic use) replaces loading
    ``AutoProcessor`` from ``pretrained``.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen2-VL-7B-Instruct",
        device: str | None = "cuda",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_new_tokens: int = 128,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        processor: Any = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        ipcv_config, llm_pruner = build_settings(**settings)
        self.runner = MultimodalRunner.from_pretrained(
            str(pretrained),
            ipcv_config=ipcv_config,
            llm_pruner=llm_pruner,
            device=device or "cuda",
            dtype=dtype,
            attn_implementation=attn_implementation,
            processor=processor,
            min_pixels=None if min_pixels is None else as_number("min_pixels", min_pixels, int),
            max_pixels=None if max_pixels is None else as_number("max_pixels", max_pixels, int),
            system_prompt=system_prompt,
            max_new_tokens=as_number("max_new_tokens", max_new_tokens, int),
        )
        self.batch_size_per_gpu = as_number("batch_size", batch_size, int)

    @property
    def model(self) -> nn.Module:
        return self.runner.model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _visuals(self, doc_to_visual: Callable[[Any], Any], doc_id: int, task: str, split: str) -> list:
        return as_list(doc_to_visual(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests' args: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``.

        Consecutive requests with equal ``gen_kwargs`` are answered together, up to
        ``batch_size`` at a time.
        """
        answers: list[str] = []
        start = 0
        while start < len(requests):
            gen_kwargs = requests[start].args[1]
            end = start + 1
            while end < len(requests) and end - start < self.batch_size and requests[end].args[1] == gen_kwargs:
                end += 1
            chunk = [request.args for request in requests[start:end]]
            contexts = [args[0] for args in chunk]
            visuals = [self._visuals(*args[2:6]) for args in chunk]
            answers += self.runner.generate(contexts, visuals, gen_kwargs)
            start = end
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Requests' args: ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            results.append(self.runner.loglikelihood(context, continuation, visuals))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} answers single-round requests only")
