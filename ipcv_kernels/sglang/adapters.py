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

InternVL (``SGLangInternVLChatAdapter``): SGLang's InternViT takes batched tiles ``[tiles, 1 + N,
D]`` as vLLM's does, so its adapter is vLLM's InternVL one (``engine.batched``: CLS rows pinned,
each image's tiles one item) with SGLang's layer parts and call sites.

Gemma 3 (``SGLangSiglipAdapter``): SGLang's SigLIP tower encodes one crop per call; its adapter is
the transformers CLIP / SigLIP one (``models.clip_vit``) with SGLang's layer parts.

Llama 4 (``SGLangLlama4Adapter``): batched tiles with the CLS last, as vLLM's Llama 4 adapter, whose
functional layer it shares; SGLang's layers take the tower's ``freqs_ci`` as transformers' do, and
``get_image_feature``'s items give each image's tiles.

CUDA graphs: SGLang's ViT CUDA-graph path (``SGLANG_VIT_ENABLE_CUDA_GRAPH``; Qwen2.5-VL's and
Qwen3-VL's ``forward_with_cuda_graph``, InternViT's graph runner) replays blocks captured for fixed
token counts per layout, which IPCV changes per input from block ``P`` on: refused when the patch is
made (``check_tower``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, ForwardState, IPCVPatch, TowerCall, read_blocks
from ..engine.batched import PrenormLayer, prenorm_layer
from ..models.clip_vit import ClipViTAdapter
from ..models.gemma4 import Gemma4Adapter, axial_rope
from ..models.llama4 import Llama4Adapter, Rotary, complex_rope
from ..models.minicpmv import MiniCPMVAdapter
from ..models.pixtral import PixtralAdapter
from ..ops import ngr_attention
from ..reference import IPCVPlan
from ..vllm.adapters import (
    VLLMGlm4vAdapter,
    VLLMInternVLChatAdapter,
    VLLMKimiK25Adapter,
    VLLMLlama4Adapter,
    VLLMQwen2VLAdapter,
    VLLMQwen3VLAdapter,
    full_width_rotary,
    interleaved_to_halves,
)

CUDA_GRAPH_VARIABLE = "SGLANG_VIT_ENABLE_CUDA_GRAPH"
# What SGLang's ``VisionAttention`` and blocks must offer (checked when the patch is made, so an
# untested SGLang version is refused with a message instead of failing in the first forward).
ATTENTION_FIELDS = ("qkv_proj", "proj", "q_size", "kv_size", "num_attention_heads_per_partition", "head_size")
TESTED_VERSION = "0.5.23"


def vit_cuda_graph_enabled() -> bool:
    """Whether SGLang's ViT CUDA graphs are on (``SGLANG_VIT_ENABLE_CUDA_GRAPH``, read as SGLang
    reads its boolean environment variables)."""
    return os.environ.get(CUDA_GRAPH_VARIABLE, "false").strip().lower() in ("1", "true", "yes", "y", "on")


def check_tower(tower: nn.Module, blocks_path: str = "blocks", attention_path: str = "attn") -> None:
    """Refuse a tower IPCV cannot patch: CUDA-graphed (``ValueError``) or of an SGLang version
    whose blocks lack what the adapter uses (``TypeError`` naming it). ``blocks_path``: the
    tower's block list; ``attention_path``: a block's ``VisionAttention``."""
    refuse_cuda_graph(tower)
    blocks = _follow(tower, blocks_path)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise TypeError(f"SGLang's {type(tower).__name__} has no blocks: not supported (tested with {TESTED_VERSION})")
    block = blocks[0]
    missing = [name for name in ("mlp", "norm1", "norm2") if not hasattr(block, name)]
    attention = _follow(block, attention_path)
    if attention is None:
        missing.append(attention_path)
    else:
        missing += [f"{attention_path}.{name}" for name in ATTENTION_FIELDS if not hasattr(attention, name)]
    if missing:
        raise TypeError(
            f"SGLang's {type(block).__name__} lacks {', '.join(missing)}: this SGLang version is not supported by "
            f"IPCV's adapter (tested with SGLang {TESTED_VERSION})"
        )


def refuse_cuda_graph(tower: nn.Module) -> None:
    """``ValueError`` for a CUDA-graphed tower (the tower's or its encoder's ``enable_cg``, or
    ``SGLANG_VIT_ENABLE_CUDA_GRAPH``)."""
    encoder = getattr(tower, "encoder", None)
    if getattr(tower, "enable_cg", False) or getattr(encoder, "enable_cg", False) or vit_cuda_graph_enabled():
        raise ValueError(
            f"IPCV cannot run in SGLang's CUDA-graphed vision encoder ({CUDA_GRAPH_VARIABLE}=1 replays blocks "
            f"captured for fixed token counts; IPCV changes them per image): unset {CUDA_GRAPH_VARIABLE} or remove "
            "the 'ipcv' key from --json-model-override-args"
        )


def _follow(module: Any, path: str) -> Any:
    """``module.a.b`` for ``path`` ``"a.b"``; ``None`` where an attribute is missing."""
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def vision_attention_layer(
    attention: nn.Module,
    norm1: nn.Module,
    norm2: nn.Module,
    mlp: Callable[[torch.Tensor], torch.Tensor],
    *,
    qk_norm: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    attn_gain: torch.Tensor | float | None = None,
    mlp_gain: torch.Tensor | float | None = None,
) -> PrenormLayer:
    """A pre-norm layer around SGLang's ``VisionAttention`` (``engine.batched.prenorm_layer``'s parts).

    ``qkv_proj`` gives the rank's ``[q | k | v]`` (``q_size``, ``kv_size``, ``kv_size`` wide; the
    rank's ``num_attention_heads_per_partition`` heads of ``head_size``); ``proj`` is row-parallel and
    returns ``(output, bias)``. ``qk_norm(q, k)``, where the tower normalises queries and keys
    (InternViT) or rotates them (Llama 4), takes and returns them as ``[rows, heads, head_size]``. The softmax scale is the
    attention's ``softmax_scale``, ``head_size ** -0.5`` where it has none.
    """
    heads, head_dim = attention.num_attention_heads_per_partition, attention.head_size

    def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projected, _ = attention.qkv_proj(x)
        q, k, v = projected.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        if qk_norm is not None:
            q, k = qk_norm(q.unflatten(-1, (heads, head_dim)), k.unflatten(-1, (-1, head_dim)))
            q, k = q.flatten(-2), k.flatten(-2)
        return q, k, v

    scale = getattr(attention, "softmax_scale", None)
    return PrenormLayer(
        norm1=norm1,
        q=None,
        k=None,
        v=None,
        qkv=qkv,
        out=lambda x: attention.proj(x)[0],
        norm2=norm2,
        mlp=mlp,
        num_heads=heads,
        head_dim=head_dim,
        scale=scale if scale is not None else head_dim**-0.5,
        attn_gain=attn_gain,
        mlp_gain=mlp_gain,
    )


def kept_metadata(metadata: Any, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> Any:
    """SGLang's ``VisionAttentionMetadata`` for the segments ``cu_seqlens`` (int32 ``[S + 1]`` on
    the device): ``cu_seqlens``, ``seq_lens`` ``[S]`` and ``max_seqlen`` (``None``: read from the
    segments, one host read). A metadata of the same class as the tower's."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return type(metadata)(cu_seqlens=cu_seqlens, seq_lens=cu_seqlens[1:] - cu_seqlens[:-1], max_seqlen=max_seqlen)


def segment_kwargs(call: BlockCall, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> dict[str, Any]:
    """The block call's keyword arguments for rows of segments ``cu_seqlens``: the tower's, with its
    ``forward_metadata`` recomputed (``kept_metadata``) where the rows are not the tower's."""
    kwargs = dict(call.kwargs)
    metadata = kwargs.get("forward_metadata")
    if metadata is not None and cu_seqlens is not call.cu_seqlens:
        kwargs["forward_metadata"] = kept_metadata(metadata, cu_seqlens, max_seqlen)
    return kwargs


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
        kwargs = segment_kwargs(call, cu_seqlens, max_seqlen)
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


class SGLangQwen3_5Adapter(SGLangQwen3VLAdapter):
    """SGLang's Qwen3.5 (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``,
    both derived from its Qwen3-VL class): Qwen3-VL's tower without DeepStack taps (an empty
    ``deepstack_merger_list``), so Qwen3-VL's adapter applies as is."""

    name = "sglang_qwen3_5"


class SGLangGlm4vAdapter(SGLangQwen2VLAdapter):
    """SGLang's ``Glm4vVisionModel`` (``Glm4vForConditionalGeneration.visual``, also GLM-4.5V's
    ``Glm4vMoeForConditionalGeneration``): Qwen2-VL's call with the blocks called as ``blk(x,
    cu_seqlens=, rotary_pos_emb_cos=, rotary_pos_emb_sin=, forward_metadata=)`` (full-width tables,
    as Qwen3-VL's), RMSNorm ``norm2`` fusing the residual add (as Qwen2.5-VL's). Items are the
    video frames and images: SGLang's GLM model gives its tower one ``grid_thw`` row per frame
    (``get_video_feature``), as transformers' does, and a direct call with a ``[t, h, w]`` row is
    split into its frames likewise (``VLLMGlm4vAdapter``)."""

    name = "sglang_glm4v"
    _pop_rotary = SGLangQwen3VLAdapter._pop_rotary
    _rotary_kwargs = SGLangQwen3VLAdapter._rotary_kwargs
    residual_mlp = SGLangQwen2_5_VLAdapter.residual_mlp
    describe_call = VLLMGlm4vAdapter.describe_call
    token_grid = VLLMGlm4vAdapter.token_grid
    _frames = staticmethod(VLLMGlm4vAdapter._frames)


class SGLangInternVLChatAdapter(VLLMInternVLChatAdapter):
    """SGLang's ``InternVisionModel`` (``InternVLChatModel.vision_model``): InternVL's own format
    (the ``OpenGVLab/InternVL2-*``, ``InternVL2_5-*``, ``InternVL3-*`` checkpoints).

    **Layers.** ``InternVisionEncoderLayer``: ``x + ls1 * attn(norm1(x))``, ``x + ls2 *
    mlp(norm2(x))`` on ``[tiles, 1 + N, D]``, its attention an ``InternAttention`` around SGLang's
    ``VisionAttention`` (``qkv_proj``: the rank's ``[q | k | v]``; an optional QK RMSNorm over every
    head, ``_apply_qk_norm``: all-gather, norm, split back under tensor parallelism; ``proj``,
    row-parallel). Layers before ``P`` run SGLang's own layer; from ``P`` on the engine runs the
    functional pre-norm layer (``engine.batched.prenorm_layer``) on the packed kept rows with this
    layer's own modules (``layer_parts``), attention through ``ngr_attention``: SGLang builds this
    attention with ``flatten_batch=False`` (one sequence per batch row), which cannot take packed
    rows of several tiles. ``qkv_proj`` runs on every row of the context (the stabilisation
    layers also compute queries of the dropped rows, ``Nd * D * D`` multiply-adds per layer).

    **Items.** SGLang encodes all tiles of a batch's images in one tower call
    (``extract_feature``); the tiles per image are known one level up: ``get_image_feature(items)``
    gets one ``MultimodalDataItem`` per image, its ``feature`` the image's tiles ``[tiles, 3, H,
    W]``. A wrapper of that method hands the counts to the tower call (``IPCVPatch.hinted``), so
    each image's tiles form one item; ``get_video_feature`` makes each frame its own item, as
    transformers does. A bare tower call treats all its tiles as one item.

    **Read layer.** ``extract_feature`` reads the last layer's output (``select_layer=-1``) or the
    ``hidden_states[select_layer]`` entry, which the wrapper passes on as the call's read block.

    **Refused:** ``--mm-enable-dp-encoder`` (the tower shards its tiles across ranks inside one
    call) and the ViT CUDA graph.
    """

    name = "sglang_internvl_chat"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if getattr(tower, "use_data_parallel", False):
            raise ValueError(
                "IPCV does not support --mm-enable-dp-encoder for InternVL's InternViT (the tower shards its tiles "
                "across ranks inside one call): leave it off"
            )
        check_tower(tower, "encoder.layers", "attn.attn")
        return tower.encoder.layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        if self.model is None:
            return
        for name, frames in (("get_image_feature", False), ("get_video_feature", True)):
            if hasattr(self.model, name):
                patch.wrap(self.model, name, functools.partial(self._read_tiles, patch, frames))

    def _read_tiles(self, patch: IPCVPatch, frames: bool, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``get_image_feature`` / ``get_video_feature`` (``frames``) telling its tower call the
        tiles of each item and the block ``extract_feature`` reads."""

        def get_feature(items: Any) -> Any:
            features = [item.feature for item in items]
            if not all(isinstance(feature, torch.Tensor) and feature.dim() == 4 for feature in features):
                return inner(items)  # precomputed embeddings: no tower call
            counts = [int(feature.shape[0]) for feature in features]
            if frames:
                counts = [1] * sum(counts)
            hints: dict[str, Any] = {"tiles_per_image": counts}
            select_layer = getattr(self.model, "select_layer", -1)
            if select_layer != -1:
                hints["read_blocks"] = read_blocks(select_layer, len(patch.blocks))
            with patch.hinted(**hints):
                return inner(items)

        return get_feature

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        attention = block.attn.attn
        return vision_attention_layer(
            attention,
            block.norm1,
            block.norm2,
            block.mlp,
            qk_norm=attention._apply_qk_norm if attention.qk_normalization else None,
            attn_gain=block.ls1,
            mlp_gain=block.ls2,
        )


# What SGLang's SigLIP tower and its layers must offer (checked when the patch is made).
SIGLIP_TOWER_PARTS = ("vision_model.embeddings", "vision_model.encoder.layers", "vision_model.config.patch_size")
SIGLIP_LAYER_PARTS = ("layer_norm1", "layer_norm2", "mlp", *(f"self_attn.{name}" for name in ATTENTION_FIELDS))


class SGLangSiglipAdapter(ClipViTAdapter):
    """SGLang's ``SiglipVisionModel`` (``siglip.py``): the ``vision_tower`` of Gemma 3
    (``Gemma3ForConditionalGeneration``).

    **Calls and items.** SGLang's ``get_image_feature`` encodes every crop of every image in a tower
    call of its own (``pixel_values`` ``[1, 3, S, S]``), so each call is one crop, one item (as in
    transformers and vLLM, where each of Gemma 3's crops is an item): nothing to wrap, a request's
    output never depends on what SGLang batched it with. No CLS token (nothing pinned); every layer
    is built and the tower's ``post_layernorm`` runs after the restored last layer.

    **Layers.** ``SiglipEncoderLayer``: ``layer_norm1``, ``self_attn`` (SGLang's
    ``VisionAttention``: ``qkv_proj``, the rank's ``[q | k | v]``; ``proj``, row-parallel),
    ``layer_norm2``, ``mlp``, called as ``layer(x [1, N, D], attention_mask, causal_attention_mask)``.
    Layers before ``P`` run SGLang's own layer, whose attention derives its one segment from its
    input's shape (the tower hands it no ``cu_seqlens`` or metadata); from ``P`` on the engine runs
    the functional pre-norm layer (``engine.batched.prenorm_layer``) on the kept rows with this
    layer's own modules, attention through ``ngr_attention``: no SGLang attention metadata exists
    in them to go stale.
    """

    name = "sglang_siglip"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        check_parts(tower, SIGLIP_TOWER_PARTS)
        layers = tower.vision_model.encoder.layers
        check_parts(layers[0], SIGLIP_LAYER_PARTS)
        refuse_cuda_graph(tower)
        vision_model = tower.vision_model
        self.has_cls = hasattr(vision_model.embeddings, "class_embedding")
        self._patch_size = vision_model.config.patch_size
        return layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Nothing: each tower call is one crop (see the class docstring)."""

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        return vision_attention_layer(block.self_attn, block.layer_norm1, block.layer_norm2, block.mlp)


def check_parts(module: nn.Module, parts: tuple[str, ...]) -> None:
    """Refuse (``TypeError`` naming them) an SGLang module lacking any of ``parts`` (dotted paths):
    an SGLang version IPCV's adapter does not know."""
    missing = [path for path in parts if _follow(module, path) is None]
    if missing:
        raise TypeError(
            f"SGLang's {type(module).__name__} lacks {', '.join(missing)}: this SGLang version is not supported by "
            f"IPCV's adapter (tested with SGLang {TESTED_VERSION})"
        )


class SGLangGemma4Adapter(Gemma4Adapter):
    """SGLang's Gemma 4 tower (``gemma4_vision.Gemma4VisionEncoder``, the ``vision_tower`` of
    ``gemma4_mm.Gemma4ForConditionalGeneration``): transformers' call and layout
    (``vision_tower(pixel_values [B, L, C p^2], pixel_position_ids [B, L, 2])``, a padded batch,
    the pooler after the encoder; items, padding rows and rotary as ``Gemma4Adapter``), SGLang's
    own layers:

    - blocks are called as ``layer(hidden_states, cos, sin, attention_mask)`` (positional);
    - a fused ``self_attn.qkv`` (``ClippableQKVParallelLinear``: the rank's ``q, k, v``), per-head
      ``q_norm`` / ``k_norm`` / ``v_norm``, ``o_proj`` (row-parallel), a fused ``mlp.gate_up``;
    - every layer ends by multiplying its output by ``layer_scalar``;
    - **padding rows attend to nothing**: SGLang's mask is ``valid_q * valid_k``, so a padding
      query has no key and its attention output is 0 (its ``sdpa`` backend; transformers lets it
      attend to the real keys). The adapter computes padding rows the same way, so ratio 0 equals
      unpatched SGLang. (SGLang 0.5.23's pooler, unlike transformers', does not zero the padding
      rows before averaging, ``mask_pad_before_pool=False``: they reach its first soft token.)

    SGLang's Gemma 4 attention takes a dense mask, not ``VisionAttentionMetadata``: from ``P`` on
    every block (stabilisation and pruned) runs the functional layer (``ngr_attention`` per image
    over its non-padding rows) with SGLang's weights and norms. The fused ``qkv`` runs on every row
    of the context, queries read at the query rows (``PrenormLayer.qkv``). Heads are the rank's
    (``num_heads_per_partition``); ``o_proj`` all-reduces as in SGLang's own layer.
    """

    name = "sglang_gemma4"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        layers = super().blocks(tower)
        parts = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp")
        parts += ("post_feedforward_layernorm", "layer_scalar", "self_attn.qkv", "self_attn.o_proj")
        parts += ("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_norm", "self_attn.num_heads_per_partition")
        missing = [part for part in parts if not _has(layers[0], part)]
        if missing:
            raise TypeError(
                f"SGLang's {type(layers[0]).__name__} lacks {', '.join(missing)}: this SGLang is not supported "
                f"by IPCV's {self.name} adapter"
            )
        return layers

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        """``(cos, sin)`` from the block's positional ``cos, sin`` (``[B, L, Dh]``), as packed rows."""
        return super().parse_block_call(args[2:], {**kwargs, "position_embeddings": (args[0], args[1])}, state)

    def context_layer(
        self, block: nn.Module, rotary: tuple[torch.Tensor, torch.Tensor], padding_queries: torch.Tensor | None
    ) -> PrenormLayer:
        """The layer's parts, ``qkv`` rotating q and k with ``rotary`` (the tables of every row of
        the context it runs on); ``padding_queries``: bool ``[Nq]``, query rows whose attention
        output is 0 (padding), ``None``: none."""
        attention = block.self_attn
        heads, kv_heads = attention.num_heads_per_partition, attention.num_kv_heads_per_partition
        head_dim, groups = attention.head_dim, heads // kv_heads

        def normed(norm: nn.Module, x: torch.Tensor, count: int) -> torch.Tensor:
            return norm(x.reshape(-1, head_dim)).reshape(x.shape[0], count, head_dim)

        def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, k, v = attention.qkv(x)
            q = axial_rope(normed(attention.q_norm, q, heads), *rotary)
            k = axial_rope(normed(attention.k_norm, k, kv_heads), *rotary).repeat_interleave(groups, dim=1)
            v = normed(attention.v_norm, v, kv_heads).repeat_interleave(groups, dim=1)
            return q.flatten(1), k.flatten(1), v.flatten(1)

        def out(attended: torch.Tensor) -> torch.Tensor:
            if padding_queries is not None:
                attended = attended.masked_fill(padding_queries[:, None], 0.0)
            return block.post_attention_layernorm(attention.o_proj(attended))

        return PrenormLayer(
            norm1=block.input_layernorm,
            q=None,
            k=None,
            v=None,
            out=out,
            norm2=block.pre_feedforward_layernorm,
            mlp=lambda x: block.post_feedforward_layernorm(block.mlp(x)),
            num_heads=heads,
            head_dim=head_dim,
            scale=1.0,
            qkv=qkv,
        )

    @staticmethod
    def _padding_of(call: BlockCall, rows: torch.Tensor | None) -> torch.Tensor | None:
        """bool padding flags of the query rows (all rows, or the kept ``rows``)."""
        state = getattr(call, "state", None)
        if state is None or state.padding is None:
            return None
        return state.padding if rows is None else state.padding[rows]

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
        cu_seqlens = cu_seqlens.to(torch.int32)
        rows, cu_keys = self.key_rows(call, hidden.shape[0], cu_seqlens)
        state = getattr(call, "state", None)
        full_length = state is None or state.padding is None or hidden.shape[0] == state.padding.shape[0]
        padding = self._padding_of(call, None if full_length else state.plan.keep)
        parts = self.context_layer(block, position_embeddings, padding)
        out = prenorm_layer(parts, hidden, hidden, None, cu_seqlens, cu_keys, config.attention_backend, rows)
        return out * block.layer_scalar

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
        rows, cu_keys = self.key_rows(call, full.shape[0], call.cu_seqlens)
        parts = self.context_layer(block, call.position_embeddings, self._padding_of(call, plan.keep))
        out = prenorm_layer(parts, kept, full, plan.keep, kept_cu_seqlens, cu_keys, config.attention_backend, rows)
        return out * block.layer_scalar


def _has(module: Any, path: str) -> bool:
    """Whether ``module.a.b...`` exists for ``path`` ``"a.b..."``."""
    for name in path.split("."):
        if not hasattr(module, name):
            return False
        module = getattr(module, name)
    return True


class SGLangPixtralAdapter(PixtralAdapter):
    """SGLang's ``PixtralHFVisionModel`` (``pixtral.py``): the ``vision_tower`` of
    ``Mistral3ForConditionalGeneration`` (``mistral.py``).

    **The call** is transformers' (``ipcv_kernels.models.pixtral``): ``tower(pixel_values [B, C,
    H, W], image_sizes)``, every image cut to its size and all of them packed into one sequence
    ``[1, n, D]``; its layers take ``(hidden, attention_mask, position_embeddings)`` with
    transformers' block-diagonal additive mask (``cu_seqlens=None`` and no
    ``VisionAttentionMetadata``: SGLang's ``VisionAttention`` attends with the mask) and the 2-D
    rotary tables ``(cos, sin)`` ``[n, Dh]``. Items: the images; segments: one per image.

    **Blocks.** Pruned blocks run SGLang's own layer on the kept rows with the mask rebuilt over
    each image's kept rows (as in transformers). The attention-stabilisation blocks run
    ``qkv_proj`` on every row (the rank's ``[q | k | v]``), ``ngr_attention`` with the kept rows as
    queries (rotary at their positions) over every key of the same image, then ``proj``
    (row-parallel: all-reduces under tensor parallelism), ``ffn_norm`` and ``feed_forward``.

    **Read layer.** ``get_image_feature`` reads the tower's output (``vision_feature_layer=-1``)
    or ``hidden_states[vision_feature_layer]``: a wrapper passes it on as the call's read block.
    The ViT CUDA graph is refused.
    """

    name = "sglang_pixtral"
    BLOCK_PARTS: tuple[str, ...] = ("attention_norm", "ffn_norm", "feed_forward", "attention")

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if vit_cuda_graph_enabled():
            check_tower(tower)  # raises the CUDA-graph refusal
        layers = _follow(tower, "transformer.layers")
        missing = [] if isinstance(layers, nn.ModuleList) and len(layers) else ["transformer.layers"]
        if not missing:
            missing += [name for name in self.BLOCK_PARTS if not hasattr(layers[0], name)]
        if not missing:
            missing += [f"attention.{name}" for name in ATTENTION_FIELDS if not hasattr(layers[0].attention, name)]
        if not hasattr(tower, "patch_size"):
            missing.append("patch_size")
        if missing:
            raise TypeError(
                f"SGLang's {type(tower).__name__} lacks {', '.join(missing)}: this SGLang version is not supported "
                f"by IPCV's adapter (tested with SGLang {TESTED_VERSION})"
            )
        self._patch_size = int(tower.patch_size)
        return layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap the model's ``get_image_feature``: it tells the tower call its read block."""
        model = self.model
        if model is not None and getattr(model, "vision_tower", None) is patch.tower:
            patch.wrap(model, "get_image_feature", functools.partial(self._read_layer, patch, model))

    @staticmethod
    def _read_layer(patch: IPCVPatch, model: nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        def get_image_feature(*args: Any, **kwargs: Any) -> Any:
            layer = getattr(model, "vision_feature_layer", -1)
            with patch.hinted(read_blocks=read_blocks(layer, patch.depth)):
                return inner(*args, **kwargs)

        return get_image_feature

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
        """Queries of the kept rows ``[Nk, D]``, keys / values of every row of ``full`` ``[n, D]``
        (this rank's heads), per image; returns the kept rows ``[Nk, D]`` of the block's output."""
        if plan.drop.shape[0] == 0:  # nothing dropped: the model's own layer (see PixtralAdapter)
            return super().stabilised_block(block, kept, full, plan, call, config, kept_cu_seqlens)
        attention = block.attention
        heads, head_dim = attention.num_attention_heads_per_partition, attention.head_size
        kv_heads = attention.kv_size // head_dim
        qkv, _ = attention.qkv_proj(block.attention_norm(full))  # every row: see the module docstring
        q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        n = full.shape[0]
        attended = ngr_attention(
            q.reshape(n, heads, head_dim),
            k.reshape(n, kv_heads, head_dim),
            v.reshape(n, kv_heads, head_dim),
            kept_cu_seqlens,
            call.cu_seqlens.to(device=full.device, dtype=torch.int32),
            softmax_scale=getattr(attention, "softmax_scale", None),
            backend=config.attention_backend,
            rotary=call.position_embeddings,
            q_rows=plan.keep,
            skip_check=True,
        )
        projected, _ = attention.proj(attended.reshape(kept.shape[0], -1))
        hidden = kept + projected
        return hidden + block.feed_forward(block.ffn_norm(hidden))


class SGLangLlama4Adapter(VLLMLlama4Adapter):
    """SGLang's ``Llama4VisionModel`` (``mllama4.py``), the ``vision_model`` of
    ``Llama4ForConditionalGeneration``: transformers' tower (spec §5.15) in SGLang's layers.

    **Layers.** ``Llama4VisionEncoderLayer(hidden [tiles, N + 1, D], freqs_ci=)`` returns the
    hidden states (a tensor). Its attention is SGLang's ``VisionAttention`` built with
    ``flatten_batch=False`` (one sequence per batch row: it cannot take packed rows of several
    tiles; it derives its segments from the batch shape, so no ``cu_seqlens`` or metadata is
    passed), ``qkv_proj`` (the rank's ``[q | k | v]``), ``proj`` (row-parallel: all-reduces under
    tensor parallelism) and transformers' ``vision_apply_rotary_emb`` with the tower's
    ``freqs_ci`` (complex ``[N + 1, 1, Dh / 2]``). Layers before ``P`` run SGLang's own layer;
    from ``P`` on the functional pre-norm layer with this layer's modules, q and k rotated as
    vLLM's adapter rotates them, from the call's ``freqs_ci`` packed as transformers' adapter
    packs it (SGLang's attention is then not called: nothing of its segments goes stale).

    **Items.** SGLang encodes all tiles of a batch's images in one tower call
    (``get_image_feature``: the items' features concatenated); ``get_image_feature(items)`` gets
    one ``MultimodalDataItem`` per image, its ``feature`` the image's tiles ``[tiles, 3, S, S]``.
    A wrapper hands the counts to the tower call (``IPCVPatch.hinted``), so each image's tiles
    form one item. A bare tower call treats all its tiles as one item.

    **Refused:** the ViT CUDA graph (``refuse_cuda_graph``).
    """

    name = "sglang_llama4"
    LAYER_PARTS: tuple[str, ...] = (
        "input_layernorm",
        "post_attention_layernorm",
        "mlp",
        *(f"self_attn.{name}" for name in ATTENTION_FIELDS),
    )

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        refuse_cuda_graph(tower)
        missing = [path for path in self.TOWER_PARTS if _follow(tower, path) is None]
        layers = tower.model.layers if not missing else None
        if layers:
            missing += [path for path in self.LAYER_PARTS if _follow(layers[0], path) is None]
        if self.model is not None and not hasattr(self.model, "get_image_feature"):
            missing.append("get_image_feature (of the model)")
        if missing or not layers:
            raise TypeError(
                f"SGLang's {type(tower).__name__} lacks {', '.join(missing) or 'layers'}: this SGLang version is not "
                f"supported by IPCV's {self.name} adapter (tested with SGLang {TESTED_VERSION})"
            )
        return layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """The wrapper of the model's ``get_image_feature`` (the tiles of each image)."""
        if self.model is not None:
            patch.wrap(self.model, "get_image_feature", functools.partial(self._read_tiles, patch))

    @staticmethod
    def _read_tiles(patch: IPCVPatch, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``get_image_feature(items)`` telling its tower call the tiles of each image."""

        def get_image_feature(items: Any) -> Any:
            counts = [int(item.feature.shape[0]) for item in items]
            with patch.hinted(tiles_per_image=counts):
                return inner(items)

        return get_image_feature

    # The layer takes the tower's ``freqs_ci`` by keyword, as transformers' does.
    parse_block_call = Llama4Adapter.parse_block_call

    def layer_parts(
        self, block: nn.Module, query_rotary: Rotary | None = None, key_rotary: Rotary | None = None
    ) -> PrenormLayer:
        """The layer around SGLang's ``VisionAttention`` (``vision_attention_layer``), q and k rotated
        with ``key_rotary``, the tables of the context rows its fused projection runs on (as
        ``VLLMLlama4Adapter.layer_parts``)."""
        if key_rotary is None:
            raise ValueError("Llama 4 layers need the rotary tables of their rows")

        def rotate(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return complex_rope(q, *key_rotary), complex_rope(k, *key_rotary)

        return vision_attention_layer(
            block.self_attn, block.input_layernorm, block.post_attention_layernorm, block.mlp, qk_norm=rotate
        )


class SGLangMiniCPMVAdapter(MiniCPMVAdapter):
    """SGLang's ``MiniCPMV_VisionTransformer`` (``minicpmv_vit.py``): the ``vpm`` of MiniCPM-V 4.6 /
    4.7 (``MiniCPMV4_6ForConditionalGeneration`` / ``MiniCPMV4_7ForConditionalGeneration``, whose
    version-dispatching wrapper holds the model as ``minicpmv``; spec §5.14).

    **The call** is transformers' (``ipcv_kernels.models.minicpmv``): ``vpm(pixel_values,
    patch_attention_mask, target_sizes, use_vit_merger)``, every slice cut to its patches and all
    of them packed into one sequence ``[1, n, D]``, 2 x 2 merged by ``vit_merger`` after block
    ``insert_layer_id`` (the later blocks take the merged slices, one segment each). Items: the
    slices; nothing pinned; ``prune_layer >= insert_layer_id + 2``.

    **Blocks.** SGLang's ``Idefics2EncoderLayer`` called as ``layer(hidden [1, n, D], cu_seqlens=,
    forward_metadata=)`` with a ``VisionAttention`` ``self_attn`` (``qkv_proj`` / ``proj``): pruned
    blocks run it on the kept rows with metadata for the kept segments (``kept_metadata``); the
    attention-stabilisation blocks run ``qkv_proj`` on every row (the rank's ``[q | k | v]``),
    ``ngr_attention`` with the kept rows as queries over every key of the same slice, ``proj``
    (row-parallel: all-reduces under tensor parallelism) and the MLP. With nothing dropped the
    model's own layer runs (ratio 0 equals the unpatched tower). The ViT CUDA graph is refused.
    """

    name = "sglang_minicpmv"
    # ``MiniCPMV_VisionTransformer.forward``'s parameters, for calls that pass them by position.
    CALL_PARAMETERS: tuple[str, ...] = ("pixel_values", "patch_attention_mask", "target_sizes", "use_vit_merger")
    LAYER_PARTS: tuple[str, ...] = (
        "layer_norm1",
        "layer_norm2",
        "mlp",
        *(f"self_attn.{name}" for name in ATTENTION_FIELDS),
    )

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        refuse_cuda_graph(tower)
        layers = super().blocks(tower)
        if not len(layers):
            raise TypeError(f"SGLang's {type(tower).__name__} has no layers (tested with SGLang {TESTED_VERSION})")
        check_parts(layers[0], self.LAYER_PARTS)
        return layers

    def _as_keywords(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**dict(zip(self.CALL_PARAMETERS, args, strict=False)), **kwargs}

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        return super().describe_call(tower, (), self._as_keywords(args, kwargs), hints)

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        return super().token_grid(tower, (), self._as_keywords(args, kwargs), hints)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        """``layer(hidden, cu_seqlens=, forward_metadata=)``: the segments from the metadata (the
        same offsets, on the device and int32) where there is one."""
        kwargs = dict(kwargs)
        positional = list(args)
        cu_seqlens = kwargs.pop("cu_seqlens") if "cu_seqlens" in kwargs else positional.pop(0)
        metadata = kwargs.get("forward_metadata")
        if metadata is not None:
            if getattr(metadata, "packed_indptrs", None) is not None:
                raise ValueError(
                    "IPCV does not support SGLang's flashinfer_cudnn vision attention (its metadata holds padded "
                    "offsets of the full sequence): choose another --mm-attention-backend"
                )
            cu_seqlens = metadata.cu_seqlens
        return BlockCall(cu_seqlens, None, tuple(positional), kwargs)

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
        """SGLang's layer on packed rows ``[N, D]`` (given to it as ``[1, N, D]``) with segments
        ``cu_seqlens``; returns ``[N, D]``. Rows other than the tower's get metadata of their own."""
        kwargs = segment_kwargs(call, cu_seqlens, max_seqlen)
        out = forward(hidden.unsqueeze(0), *call.args, cu_seqlens=cu_seqlens.to(torch.int32), **kwargs)
        return out.reshape(-1, hidden.shape[-1])

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
        """Queries of the kept rows ``[Nk, D]``, keys / values of every row of ``full`` ``[n, D]``
        (this rank's heads), per slice; returns the kept rows ``[Nk, D]`` of the block's output."""
        if plan.drop.shape[0] == 0:  # nothing dropped: the model's own layer (see MiniCPMVAdapter)
            return super().stabilised_block(block, kept, full, plan, call, config, kept_cu_seqlens)
        # ``qkv_proj`` on every row (see the module docstring), the kept rows' queries over them.
        layer = vision_attention_layer(block.self_attn, block.layer_norm1, block.layer_norm2, block.mlp)
        segments = call.cu_seqlens.to(device=full.device, dtype=torch.int32)
        return prenorm_layer(layer, kept, full, plan.keep, kept_cu_seqlens, segments, config.attention_backend)


class SGLangKimiK25Adapter(VLLMKimiK25Adapter):
    """SGLang's ``MoonViT3dPretrainedModel`` (``kimi_k25.py``): the ``vision_tower`` of
    ``KimiK25ForConditionalGeneration`` (Kimi-K2.5), vLLM's MoonViT call and items
    (``VLLMKimiK25Adapter``: ``tower(pixel_values [n, 3, p, p], grid_thws)``, the ``grid_thws``
    rows as items, patches row-major) with SGLang's blocks.

    **Blocks.** ``x = x + attn(norm0(x)); x = x + mlp(norm1(x))`` on packed rows, called as ``blk(x, cu_seqlens, max_seqlen, rope_freqs_cis=, forward_metadata=,
    sequence_lengths=)``; ``attn`` is SGLang's ``VisionAttention`` (``qkv_proj``: the rank's
    ``[q | k | v]``; ``proj``: row-parallel) with the interleaved complex rotary (``apply_rope``).
    The rotary table is complex ``[n, Dh / 2]``, or, on CUDA in 16-bit, prepared for SGLang's
    in-place kernel (``prepare_fused_qk_complex_rope_inplace``: ``(cat(real, imag) [n, Dh],
    positions)``); either way the engine gathers its real and imaginary parts, and a block run on
    other rows gets the table in the tower's form again. Pruned blocks get ``max_seqlen``,
    ``sequence_lengths`` and ``VisionAttentionMetadata`` of the kept segments; ``flashinfer_cudnn``
    metadata is refused, as the CUDA-graphed encoder is. The stabilisation blocks as vLLM's
    adapter's, on SGLang's ``qkv_proj`` / ``proj``.
    """

    name = "sglang_kimi_k25"
    BLOCK_PARTS: tuple[str, ...] = ("norm0", "norm1", "mlp", "attn")

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        refuse_cuda_graph(tower)
        blocks = _follow(tower, "encoder.blocks")
        missing = [] if isinstance(blocks, nn.ModuleList) and len(blocks) else ["encoder.blocks"]
        if not missing:
            missing += [name for name in self.BLOCK_PARTS if not hasattr(blocks[0], name)]
        if not missing:
            missing += [f"attn.{name}" for name in ATTENTION_FIELDS if not hasattr(blocks[0].attn, name)]
        if missing:
            raise TypeError(
                f"SGLang's {type(tower).__name__} lacks {', '.join(missing)}: this SGLang version is not supported "
                f"by IPCV's adapter (tested with SGLang {TESTED_VERSION})"
            )
        return blocks

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])

    def unpack(self, packed: torch.Tensor, layout: torch.Size) -> torch.Tensor:
        return packed.view(layout)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        kwargs = dict(kwargs)
        positional = list(args)
        cu_seqlens = kwargs.pop("cu_seqlens") if "cu_seqlens" in kwargs else positional.pop(0)
        max_seqlen = kwargs.pop("max_seqlen") if "max_seqlen" in kwargs else positional.pop(0)
        rope = kwargs.pop("rope_freqs_cis") if "rope_freqs_cis" in kwargs else positional.pop(0)
        metadata = kwargs.get("forward_metadata")
        if metadata is not None and getattr(metadata, "packed_indptrs", None) is not None:
            raise ValueError(
                "IPCV does not support SGLang's flashinfer_cudnn vision attention (its metadata holds padded "
                "offsets of the full sequence): choose another --mm-attention-backend"
            )
        if isinstance(rope, tuple):  # prepared for the in-place kernel: a (cos | sin) cache and positions
            cache, positions = rope
            half = cache.shape[-1] // 2
            rows = cache[positions]
            rotary = (rows[:, :half], rows[:, half:])
        else:
            rotary = (rope.real, rope.imag)
        # The tower's own forms stay in the call: run_block gives other rows theirs.
        kwargs.update(max_seqlen=max_seqlen, rope_freqs_cis=rope)
        return BlockCall(cu_seqlens.to(torch.int32), rotary, tuple(positional), kwargs)

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
        """SGLang's block on packed rows ``[N, D]`` with segments ``cu_seqlens``; rows other than
        the tower's get their rotary rows in the tower's form and metadata of their own."""
        kwargs = dict(call.kwargs)
        if cu_seqlens is not call.cu_seqlens:
            cu_seqlens = cu_seqlens.to(torch.int32)
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            longest = max_seqlen if max_seqlen is not None else int(lengths.max()) if lengths.numel() else 0
            kwargs["max_seqlen"] = longest
            if kwargs.get("sequence_lengths") is not None:
                kwargs["sequence_lengths"] = lengths
            metadata = kwargs.get("forward_metadata")
            if metadata is not None:
                kwargs["forward_metadata"] = kept_metadata(metadata, cu_seqlens, longest)
            real, imag = position_embeddings
            table = torch.complex(real.float(), imag.float())
            if isinstance(kwargs["rope_freqs_cis"], tuple):
                from sglang.kernels.ops.attention.vision_rope import prepare_fused_qk_complex_rope_inplace

                kwargs["rope_freqs_cis"] = prepare_fused_qk_complex_rope_inplace(table)
            else:
                kwargs["rope_freqs_cis"] = table
        out = forward(hidden, cu_seqlens, kwargs.pop("max_seqlen"), *call.args, **kwargs)
        return out.reshape(-1, out.shape[-1])

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
        """Queries of the kept rows ``[Nk, D]``, keys / values of every row of ``full`` ``[n, D]``
        (this rank's heads); returns the kept rows ``[Nk, D]`` of the block's output."""
        attention = block.attn
        heads, head_dim = attention.num_attention_heads_per_partition, attention.head_size
        kv_heads = attention.kv_size // head_dim
        qkv, _ = attention.qkv_proj(block.norm0(full))  # every row: see the module docstring
        q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        n = full.shape[0]
        order = interleaved_to_halves(head_dim, full.device)
        real, imag = call.position_embeddings
        attended = ngr_attention(
            q.reshape(n, heads, head_dim)[..., order],
            k.reshape(n, kv_heads, head_dim)[..., order],
            v.reshape(n, kv_heads, head_dim),
            kept_cu_seqlens,
            call.cu_seqlens,
            softmax_scale=getattr(attention, "softmax_scale", None),
            backend=config.attention_backend,
            rotary=full_width_rotary(real, imag),
            q_rows=plan.keep,
            skip_check=True,
        )
        projected, _ = attention.proj(attended.reshape(kept.shape[0], -1))
        hidden = kept + projected
        return hidden + block.mlp(block.norm1(hidden))
