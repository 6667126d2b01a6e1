"""Family adapters for SGLang's own vision encoders (``sglang.srt.models.*``), on the
framework-independent engine (``ipcv_kernels.engine``).

SGLang's Qwen towers lay their blocks out as vLLM's do (``ipcv_kernels.vllm.adapters``, whose
item, grid and packing logic these adapters inherit): packed patches, ``grid_thw`` rows as items,
blocks taking ``x`` as ``[S, 1, D]``. What differs:

- **Per-forward attention metadata.** The tower computes one ``VisionAttentionMetadata``
  (``cu_seqlens`` on the device, ``seq_lens``, ``max_seqlen``) per segment layout
  (``prepare_vision_attention_metadata``) and hands it to every block as ``forward_metadata``;
  the GPU backends (``fa3``, ``fa4``, ``triton_attn``, ``aiter_attn``, ``ascend_attn``) read
  their segments from it, not from ``cu_seqlens``. A pruned block gets metadata recomputed for
  the kept segments (``kept_metadata``, no host read: the engine already knows the longest kept
  segment); a block run on the full sequence keeps the tower's. The CPU ``sdpa`` backend reads
  ``cu_seqlens`` only, so a stale metadata bug would not show on the CPU:
  ``tests/sglang`` checks every attention call's metadata against its ``cu_seqlens``.
  ``flashinfer_cudnn`` metadata carries padded, bucketed element offsets of the full sequence
  (``packed_indptrs``): refused when a block receives it.
- **Segments on the device.** Qwen2-VL's tower passes ``cu_seqlens`` on the host (the NumPy
  helper) and the same offsets on the device in the metadata; the engine takes the metadata's
  (device, int32), so planning and shrinking never mix devices.
- **Rotary tables.** Qwen2-VL / Qwen2.5-VL blocks take full-width ``position_embeddings``
  ``(cos, sin)`` ``[S, Dh]``; Qwen3-VL's take ``rotary_pos_emb_cos`` / ``_sin`` (half or full
  width; ``VisionAttention`` widens half tables itself).
- **Attention.** ``VisionAttention`` with ``qkv_proj`` (``QKVParallelLinear``: the rank's
  ``[q | k | v]``, ``q_size`` / ``kv_size`` wide) and ``proj`` (``RowParallelLinear``, which
  all-reduces under tensor parallelism). The attention-stabilisation blocks run ``qkv_proj`` on
  every row (keys and values need them; the queries are then read at the kept rows through
  ``ngr_attention``'s ``q_rows``: the ``W_q`` third of the projection is also computed for the
  dropped rows, ``Nd * D * D`` multiply-adds per stabilisation block), ``ngr_attention`` on the
  rank's heads and the block's own ``proj``, norms and MLP. Pruned blocks run SGLang's own block,
  hence its own attention backend.

Tensor parallelism: SGLang shards the heads (``qkv_proj`` / ``proj``) and the MLP; the hidden
states between blocks are replicated, so every rank plans the same ``keep`` / ``drop`` /
neighbours, and the stabilisation blocks compute the rank's heads as SGLang's own block does.

CUDA graphs: SGLang's ViT CUDA-graph path (``SGLANG_VIT_ENABLE_CUDA_GRAPH``; Qwen2.5-VL's and
Qwen3-VL's ``forward_with_cuda_graph``) replays blocks captured for fixed token counts per layout,
which IPCV changes per input from block ``P`` on: refused when the patch is made
(``check_tower``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, ForwardState
from ..ops import ngr_attention
from ..reference import IPCVPlan
from ..vllm.adapters import VLLMQwen2VLAdapter, VLLMQwen3VLAdapter

CUDA_GRAPH_VARIABLE = "SGLANG_VIT_ENABLE_CUDA_GRAPH"
# What SGLang's ``VisionAttention`` and blocks must offer (checked when the patch is made, so an
# untested SGLang version is refused with a message instead of failing in the first forward).
ATTENTION_FIELDS = ("qkv_proj", "proj", "q_size", "kv_size", "num_attention_heads_per_partition", "head_size")
TESTED_VERSION = "0.5.23"


def vit_cuda_graph_enabled() -> bool:
    """Whether SGLang's ViT CUDA graphs are on (``SGLANG_VIT_ENABLE_CUDA_GRAPH``, read as SGLang
    reads its boolean environment variables)."""
    return os.environ.get(CUDA_GRAPH_VARIABLE, "false").strip().lower() in ("1", "true", "yes", "y", "on")


def check_tower(tower: nn.Module) -> None:
    """Refuse a tower IPCV cannot patch: CUDA-graphed (``ValueError``) or of an SGLang version
    whose blocks lack what the adapter uses (``TypeError`` naming it)."""
    if getattr(tower, "enable_cg", False) or vit_cuda_graph_enabled():
        raise ValueError(
            f"IPCV cannot run in SGLang's CUDA-graphed vision encoder ({CUDA_GRAPH_VARIABLE}=1 replays blocks "
            f"captured for fixed token counts; IPCV changes them per image): unset {CUDA_GRAPH_VARIABLE} or remove "
            "the 'ipcv' key from --json-model-override-args"
        )
    blocks = getattr(tower, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise TypeError(f"SGLang's {type(tower).__name__} has no blocks: not supported (tested with {TESTED_VERSION})")
    block = blocks[0]
    missing = [name for name in ("attn", "mlp", "norm1", "norm2") if not hasattr(block, name)]
    missing += [f"attn.{name}" for name in ATTENTION_FIELDS if hasattr(block, "attn") and not hasattr(block.attn, name)]
    if missing:
        raise TypeError(
            f"SGLang's {type(block).__name__} lacks {', '.join(missing)}: this SGLang version is not supported by "
            f"IPCV's adapter (tested with SGLang {TESTED_VERSION})"
        )


def kept_metadata(metadata: Any, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> Any:
    """SGLang's ``VisionAttentionMetadata`` for the segments ``cu_seqlens`` (int32 ``[S + 1]`` on
    the device): ``cu_seqlens``, ``seq_lens`` ``[S]`` and ``max_seqlen`` (``None``: read from the
    segments, one host read). A metadata of the same class as the tower's."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return type(metadata)(cu_seqlens=cu_seqlens, seq_lens=cu_seqlens[1:] - cu_seqlens[:-1], max_seqlen=max_seqlen)


class SGLangQwen2VLAdapter(VLLMQwen2VLAdapter):
    """SGLang's ``Qwen2VisionTransformer`` (``Qwen2VLForConditionalGeneration.visual``).

    Block: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` on ``[S, 1, D]``, called as
    ``blk(x, cu_seqlens=, position_embeddings=(cos, sin) [S, Dh], forward_metadata=)``; items are
    the ``grid_thw`` rows (each image, or each video, one item).
    """

    name = "sglang_qwen2_vl"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        check_tower(tower)
        return tower.blocks

    # -- what a block call carries ---------------------------------------------------------------
    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        kwargs = dict(kwargs)
        positional = list(args)
        cu_seqlens = kwargs.pop("cu_seqlens") if "cu_seqlens" in kwargs else positional.pop(0)
        position_embeddings = self._pop_rotary(kwargs, positional)
        metadata = kwargs.get("forward_metadata")
        if metadata is not None:
            if getattr(metadata, "packed_indptrs", None) is not None:
                raise ValueError(
                    "IPCV does not support SGLang's flashinfer_cudnn vision attention (its metadata holds padded "
                    "offsets of the full sequence): choose another --mm-attention-backend"
                )
            cu_seqlens = metadata.cu_seqlens  # the same offsets, on the device and int32
        return BlockCall(cu_seqlens, position_embeddings, tuple(positional), kwargs)

    def _pop_rotary(self, kwargs: dict[str, Any], positional: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The block call's rotary tables ``(cos, sin)``, taken out of its arguments."""
        if "position_embeddings" in kwargs:
            return kwargs.pop("position_embeddings")
        return positional.pop(0)

    def _rotary_kwargs(self, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
        """The block's keyword arguments for the rotary tables ``position_embeddings``."""
        return {"position_embeddings": position_embeddings}

    # -- the model's own block -------------------------------------------------------------------
    def run_block(
        self,
        block: nn.Module,
        forward: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        call: BlockCall,
        config: IPCVConfig,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """SGLang's block on packed rows ``[N, D]`` (given to it as ``[N, 1, D]``) with segments
        ``cu_seqlens``; returns ``[N, D]``. Rows other than the tower's get metadata of their own."""
        kwargs = dict(call.kwargs)
        metadata = kwargs.get("forward_metadata")
        if metadata is not None and cu_seqlens is not call.cu_seqlens:
            kwargs["forward_metadata"] = kept_metadata(metadata, cu_seqlens, max_seqlen)
        if self.blocks_modify_input:
            hidden = hidden.clone()  # the engine keeps the tensors it hands out (the base's kept rows)
        out = forward(
            hidden.unsqueeze(1),
            *call.args,
            cu_seqlens=cu_seqlens.to(torch.int32),
            **self._rotary_kwargs(position_embeddings),
            **kwargs,
        )
        return out.squeeze(1)

    # -- attention stabilisation -----------------------------------------------------------------
    def stabilised_block(
        self,
        block: nn.Module,
        kept: torch.Tensor,
        full: torch.Tensor,
        plan: IPCVPlan,
        call: BlockCall,
        config: IPCVConfig,
        kept_cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """Queries of the kept rows ``kept`` ``[Nk, D]``, keys / values of every row of ``full``
        ``[n, D]`` (this rank's heads); returns the kept rows ``[Nk, D]`` of the block's output."""
        attention = block.attn
        heads, head_dim = attention.num_attention_heads_per_partition, attention.head_size
        kv_heads = attention.kv_size // head_dim
        qkv, _ = attention.qkv_proj(self.norm1(block, full))  # every row: see the module docstring
        q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        n = full.shape[0]
        attended = ngr_attention(
            q.reshape(n, heads, head_dim),
            k.reshape(n, kv_heads, head_dim),
            v.reshape(n, kv_heads, head_dim),
            kept_cu_seqlens,
            call.cu_seqlens.to(torch.int32),
            softmax_scale=getattr(attention, "softmax_scale", None),
            backend=config.attention_backend,
            rotary=self.full_width_rotary(call.position_embeddings, head_dim),
            q_rows=plan.keep,
            skip_check=True,
        )
        projected, _ = attention.proj(attended.reshape(kept.shape[0], -1))
        return self.residual_mlp(block, kept, projected)

    @staticmethod
    def full_width_rotary(
        position_embeddings: tuple[torch.Tensor, torch.Tensor], head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's rotary tables as ``rotate_half`` tables ``[S, Dh]`` (half-width neox
        tables ``[S, Dh / 2]`` are doubled, as ``VisionAttention`` does)."""
        cos, sin = position_embeddings
        if cos.shape[-1] * 2 == head_dim:
            return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        return cos, sin

    def norm1(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block's first norm on rows ``[n, D]``."""
        return block.norm1(x)

    def residual_mlp(self, block: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the block after its attention: ``y = x + attended; y + mlp(norm2(y))``."""
        hidden = x + attended
        return hidden + block.mlp(block.norm2(hidden))


class SGLangQwen2_5_VLAdapter(SGLangQwen2VLAdapter):
    """SGLang's ``Qwen2_5_VisionTransformer``: windows and full-attention blocks both arrive as
    the block's ``cu_seqlens`` (with the matching ``forward_metadata``) over the ``window_index``
    order, and ``norm2`` fuses the residual add (``normed, residual = norm2(x, residual=attn)``).
    The full-attention offsets start with an empty segment (``[0, 0, n_1, ...]``), which the
    engine's kept segments drop for SGLang's block. Restoration writes the full sequence in the
    tower's (window) order, so the merger and ``reverse_indices`` give the usual output."""

    name = "sglang_qwen2_5_vl"

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Unknown: the tower reorders its rows by windows inside its forward (a selector that
        needs the grid, such as ``"uniform"``, refuses)."""
        return None

    def residual_mlp(self, block: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        normed, residual = block.norm2(x, residual=attended)
        return residual + block.mlp(normed)


class SGLangQwen3VLAdapter(SGLangQwen2VLAdapter):
    """SGLang's ``Qwen3VLMoeVisionModel`` (``Qwen3VLForConditionalGeneration.visual``, also the
    MoE variant's): Qwen2-VL's block (plain ``norm2``) called as ``blk(x, cu_seqlens=,
    rotary_pos_emb_cos=, rotary_pos_emb_sin=, forward_metadata=)``, items the ``grid_thw`` rows
    (segments: each frame), and the DeepStack taps.

    The block adds into its input in place (``x += attn``, ``x += mlp``): the engine records a
    copy of block ``P-1``'s input (``blocks_modify_input``) and pruned blocks get a copy of their
    rows (``Nk * D`` per pruned block), since the engine keeps the tensors it hands out.

    After each block of ``deepstack_visual_indexes`` the tower feeds that block's output to a
    ``deepstack_merger_list`` merger; in the pruned stretch a block returns the kept rows, so a
    forward pre-hook on every DeepStack merger restores the full sequence first. The tower's output
    is the merger's and every tap's, concatenated along features, all restored.
    """

    name = "sglang_qwen3_vl"
    blocks_modify_input = True
    install_hooks = VLLMQwen3VLAdapter.install_hooks

    def _pop_rotary(self, kwargs: dict[str, Any], positional: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tables = []
        for name in ("rotary_pos_emb_cos", "rotary_pos_emb_sin"):
            tables.append(kwargs.pop(name) if name in kwargs else positional.pop(0))
        if kwargs.get("sequence_lengths") is not None:
            raise ValueError(
                "IPCV does not support SGLang's flashinfer_cudnn vision attention (sequence_lengths): choose "
                "another --mm-attention-backend"
            )
        return tables[0], tables[1]

    def _rotary_kwargs(self, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
        cos, sin = position_embeddings
        return {"rotary_pos_emb_cos": cos, "rotary_pos_emb_sin": sin}
