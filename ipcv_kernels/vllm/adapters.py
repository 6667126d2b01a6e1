"""Family adapters for vLLM's own vision encoders (``vllm.model_executor.models.*``), on the
framework-independent engine (``ipcv_kernels.engine``).

vLLM's Qwen towers differ from transformers' in what their blocks receive, not in what they
compute:

- blocks take ``x`` as ``[S, 1, D]`` (``pack`` / ``unpack`` turn it into the engine's packed rows
  ``[S, D]``; from block ``P`` on the blocks receive and return kept rows, and the restored
  ``[S, 1, D]`` goes to the merger);
- rotary tables arrive as ``rotary_pos_emb_cos`` / ``rotary_pos_emb_sin``, half-width
  ``[S, Dh / 2]`` (neox style: ``x1 * cos - x2 * sin``, ``x2 * cos + x1 * sin`` on the two halves),
  equal to the full-width ``rotate_half`` tables ``cat([cos, cos], -1)`` that ``ngr_attention``
  takes;
- ``max_seqlen`` is a tensor (``None`` on backends that do not read it);
- linear layers are vLLM's (``ColumnParallelLinear`` / ``RowParallelLinear``), called as
  ``out, bias = layer(x)``. On the CPU vLLM repacks their weights for its GEMM kernels (the
  module's ``weight`` may be empty), so the attention-stabilisation blocks never slice weight
  rows: they run ``qkv`` on every row and keep the query rows afterwards. Cost: the ``W_q`` third
  of the ``qkv`` projection is also computed for the dropped rows, ``Nd * D * D`` multiply-adds
  per stabilisation block (keys and values need every row anyway).

vLLM's CLIP / SigLIP towers (``VLLMClipViTAdapter``: LLaVA 1.5, ...) take a padded batch of
crops ``[B, L, D]`` as in transformers, with a fused ``qkv_proj``; vLLM builds them only up to the
layer the model reads. vLLM's InternViT (``VLLMInternVLAdapter``) takes batched tiles ``[tiles, 1 + N, D]`` as in
transformers, so its adapter is a ``BatchedTowerAdapter`` (``ipcv_kernels.engine.batched``); what
is vLLM's there is where the tiles per image come from (see the class).
vLLM's Llama 4 tower (``VLLMLlama4Adapter``) takes batched tiles too, CLS last, its rotary applied
inside the attention from a table the adapter reads (see the class).

Tensor parallelism: the hidden states are replicated on every rank, so every rank plans the same
``keep`` / ``drop`` / neighbours; ``qkv`` + ``split_qkv`` give the rank's heads (vLLM's own
all-gather and split), ``ngr_attention`` runs on those heads and ``proj`` (row-parallel)
all-reduces, exactly as in vLLM's own block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, FamilyAdapter, ForwardState, IPCVPatch, TowerCall
from ..engine.batched import PrenormLayer, TiledTowerAdapter, sequence_segments, without_padding
from ..models.clip_vit import ClipViTAdapter
from ..models.gemma4 import Gemma4Adapter
from ..models.idefics3 import Idefics3Adapter
from ..models.llama4 import Llama4Adapter, Rotary, complex_rope, tuple_output
from ..models.minicpmv import check_prune_layer, slice_grids
from ..ops import ngr_attention
from ..reference import IPCVPlan
from ..selectors import merge_unit_grid, token_grid
from .compat import missing_parameters, missing_parts, require


def full_width_rotary(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's half-width neox tables ``[N, Dh / 2]`` as ``rotate_half`` tables ``[N, Dh]``."""
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


class VLLMQwen2VLAdapter(FamilyAdapter):
    """vLLM's ``Qwen2VisionTransformer`` (``Qwen2VLForConditionalGeneration.visual``).

    Block: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``; items are the ``grid_thw`` rows.
    """

    name = "vllm_qwen2_vl"
    # What the adapter goes through (a vLLM without one of them is refused when the patch is made).
    TOWER_PARTS: tuple[str, ...] = ("blocks", "spatial_merge_size")
    BLOCK_PARTS: tuple[str, ...] = ("norm1", "norm2", "mlp", "attn.qkv", "attn.proj", "attn.split_qkv")
    BLOCK_PARAMETERS: tuple[str, ...] = ("cu_seqlens", "rotary_pos_emb_cos", "rotary_pos_emb_sin")

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        missing = missing_parts(tower, self.TOWER_PARTS)
        if not missing and len(tower.blocks):
            block = tower.blocks[0]
            missing += missing_parts(block, self.BLOCK_PARTS)
            missing += missing_parameters(type(block).forward, self.BLOCK_PARAMETERS)
        require(tower, missing, self.name)
        return tower.blocks

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else (args[1] if len(args) > 1 else None)
        if grid_thw is None:
            # Only the encoder CUDA-graph path calls the tower without a grid (refused at start).
            raise ValueError("IPCV needs the tower's grid_thw (a CUDA-graphed encoder call has none)")
        rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
        return TowerCall([int(t) * int(h) * int(w) for t, h, w in rows])

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each image / video frame its own part, patches in merge-unit order (as HF's Qwen2-VL)."""
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
        return merge_unit_grid([[int(v) for v in row] for row in rows], tower.spatial_merge_size)

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])

    def unpack(self, packed: torch.Tensor, layout: torch.Size) -> torch.Tensor:
        return packed.view(layout)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        kwargs = dict(kwargs)
        names = ("cu_seqlens", "rotary_pos_emb_cos", "rotary_pos_emb_sin")
        values = [kwargs.pop(name) if name in kwargs else None for name in names]
        positional = list(args)
        for i, value in enumerate(values):  # the tower passes them by keyword; accept positions too
            if value is None and positional:
                values[i] = positional.pop(0)
        cu_seqlens, cos, sin = values
        if kwargs.get("sequence_lengths") is not None:
            raise ValueError("IPCV does not support vLLM's FlashInfer cuDNN ViT backend (sequence_lengths)")
        return BlockCall(cu_seqlens, (cos, sin), tuple(positional), kwargs)

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
        """vLLM's block on packed rows ``[N, D]`` (given to it as ``[N, 1, D]``); returns ``[N, D]``."""
        kwargs = dict(call.kwargs)
        if max_seqlen is not None and kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = torch.tensor(max_seqlen, dtype=torch.int32, device=kwargs["max_seqlen"].device)
        cos, sin = position_embeddings
        out = forward(
            hidden.unsqueeze(1),
            *call.args,
            cu_seqlens=cu_seqlens.to(torch.int32),
            rotary_pos_emb_cos=cos,
            rotary_pos_emb_sin=sin,
            **kwargs,
        )
        return out.squeeze(1)

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
        """Queries of the kept rows, keys / values of every row of ``full`` ``[n, D]``; returns
        the kept rows ``[Nk, D]`` of the block's output."""
        attention = block.attn
        qkv, _ = attention.qkv(block.norm1(full).unsqueeze(1))  # every row: see the module docstring
        q, k, v = self.split_qkv(attention, qkv)
        attended = ngr_attention(
            q[plan.keep],
            k,
            v,
            kept_cu_seqlens,
            call.cu_seqlens.to(torch.int32),
            backend=config.attention_backend,
            rotary=full_width_rotary(*call.position_embeddings),
            q_positions=plan.keep,
            skip_check=True,
        )
        projected, _ = attention.proj(attended.reshape(kept.shape[0], 1, -1))
        return self.residual_mlp(block, kept.unsqueeze(1), projected).squeeze(1)

    def split_qkv(self, attention: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``qkv`` ``[n, 1, 3 * width of this rank]`` as q, k, v ``[n, heads of this rank, Dh]``
        (vLLM's own split: all-gather and per-rank split of the ``[q; k; v]`` layout)."""
        return tuple(x.squeeze(1) for x in attention.split_qkv(qkv))

    def residual_mlp(self, block: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the block after its attention: ``y = x + attended; y + mlp(norm2(y))``."""
        hidden = x + attended
        return hidden + block.mlp(block.norm2(hidden))


class VLLMQwen2_5_VLAdapter(VLLMQwen2VLAdapter):
    """vLLM's ``Qwen2_5_VisionTransformer``: windows and full-attention blocks both arrive as the
    block's ``cu_seqlens`` over the ``window_index`` order (the engine shrinks each), and
    ``norm2`` fuses the residual add (``normed, residual = norm2(x, residual=attended)``).
    Restoration writes the full sequence in the tower's (window) order, so the tower's merger
    and ``reverse_indices`` give the usual output."""

    name = "vllm_qwen2_5_vl"
    BLOCK_PARTS: tuple[str, ...] = (
        "norm1",
        "norm2",
        "mlp",
        "attn.qkv",
        "attn.proj",
        "attn.num_attention_heads_per_partition",
        "attn.hidden_size_per_attention_head",
    )

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Unknown: the tower reorders its rows by windows inside its forward, which the adapter
        does not reproduce (a selector that needs the grid, such as ``"uniform"``, refuses)."""
        return None

    def split_qkv(self, attention: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The rank's output is already per head ``(three, head, head_dim)``: no gather.
        heads, head_dim = attention.num_attention_heads_per_partition, attention.hidden_size_per_attention_head
        return qkv.view(qkv.shape[0], 3, heads, head_dim).unbind(1)

    def residual_mlp(self, block: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        normed, residual = block.norm2(x, residual=attended)
        return residual + block.mlp(normed)


class VLLMQwen3VLAdapter(VLLMQwen2VLAdapter):
    """vLLM's ``Qwen3_VisionTransformer``: Qwen2-VL's block (plain ``norm2``) around Qwen2.5-VL's
    attention (per-head ``qkv`` layout), items the ``grid_thw`` rows, and the DeepStack taps.

    After each block of ``deepstack_visual_indexes`` the tower feeds that block's output to a
    ``deepstack_merger_list`` merger (features for early LLM layers, concatenated to the merger's
    output along the feature axis). In the pruned stretch a block returns the kept rows
    ``[Nk, D]``; a forward pre-hook on every DeepStack merger restores the full ``[n, D]``
    first (``IPCVPatch.restore_inputs``), so every tap, like the final merger, sees every token
    in the usual order.
    """

    name = "vllm_qwen3_vl"
    split_qkv = VLLMQwen2_5_VLAdapter.split_qkv
    TOWER_PARTS: tuple[str, ...] = ("blocks", "spatial_merge_size", "deepstack_merger_list")
    BLOCK_PARTS = VLLMQwen2_5_VLAdapter.BLOCK_PARTS

    def install_hooks(self, patch: IPCVPatch) -> None:
        patch.restore_inputs(patch.tower.deepstack_merger_list)


class VLLMQwen3_5Adapter(VLLMQwen3VLAdapter):
    """vLLM's Qwen3.5 (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``):
    vLLM builds Qwen3-VL's ``Qwen3_VisionTransformer`` for it, with an empty
    ``deepstack_merger_list`` (the vision config has no ``deepstack_visual_indexes``), so Qwen3-VL's
    adapter applies with no tap to restore."""

    name = "vllm_qwen3_5"


class VLLMGlm4vAdapter(VLLMQwen2VLAdapter):
    """vLLM's ``Glm4vVisionTransformer`` (``Glm4vForConditionalGeneration.visual``, also GLM-4.5V's
    ``Glm4vMoeForConditionalGeneration``): Qwen2-VL's call (blocks take ``x [S, 1, D]``,
    ``cu_seqlens``, half-width ``rotary_pos_emb_cos`` / ``_sin``, ``max_seqlen``; items the
    ``grid_thw`` rows, patches in merge-unit order) with a ``QKVParallelLinear`` whose ``split_qkv``
    gives the rank's heads without a gather, and Qwen2.5-VL's fused residual RMSNorm ``norm2``.
    Position embeddings are added before block 0; ``post_layernorm``, ``downsample`` and the
    merger run after the last block, on the restored full sequence.

    Items: transformers' GLM model calls its tower with one ``grid_thw`` row per video frame
    (``get_video_features``), so there each frame is an item; vLLM's model passes a video's
    ``[t, h, w]`` row as is. The adapter splits such rows into their frames, so that a video's
    frames are items as in transformers (images are unchanged)."""

    name = "vllm_glm4v"
    residual_mlp = VLLMQwen2_5_VLAdapter.residual_mlp

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        # Qwen2-VL's checks (a call without grid_thw is refused); SGLang's GLM adapter shares this.
        VLLMQwen2VLAdapter.describe_call(self, tower, args, kwargs, hints)
        return TowerCall([length for length, _ in self._frames(args, kwargs)])

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Qwen2-VL's grid with each video frame its own part (as its own ``[1, h, w]`` row)."""
        rows = [[1, h, w] for _, (h, w) in self._frames(args, kwargs)]
        return merge_unit_grid(rows, tower.spatial_merge_size)

    @staticmethod
    def _frames(args: tuple, kwargs: dict[str, Any]) -> list[tuple[int, tuple[int, int]]]:
        """``(h * w, (h, w))`` of every frame of the call's ``grid_thw`` rows, in packing order."""
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
        return [(int(h) * int(w), (int(h), int(w))) for t, h, w in rows for _ in range(int(t))]


def interleaved_to_halves(head_dim: int, device: torch.device) -> torch.Tensor:
    """int64 ``[Dh]``: the head features ``0, 2, 4, ..`` then ``1, 3, 5, ..``.

    An interleaved ("complex") rotary turns the pairs ``(x[2i], x[2i + 1])`` by angle ``i``; on
    the features in this order it is the ``rotate_half`` rotary with tables ``cat([cos, cos])``,
    ``cat([sin, sin])``. Attention scores ``q . k`` do not change when q and k take the same order,
    so ``ngr_attention`` runs on q and k reordered so (values keep theirs)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(device)


class VLLMKimiK25Adapter(FamilyAdapter):
    """vLLM's ``MoonViT3dPretrainedModel`` (``kimi_k25_vit.py``): the ``vision_tower`` of
    ``KimiK25ForConditionalGeneration`` (Kimi-K2.5), the same computation as transformers'
    ``Kimi_K25VisionModel`` (spec §5.10) in vLLM's layout.

    **The call.** ``tower(pixel_values [n, 3, p, p], grid_thws, encoder_metadata=...)``: the tower
    embeds the patches, then ``encoder`` runs ``encoder.blocks`` on packed rows ``[n, D]`` with
    ``cu_seqlens`` (one segment per ``grid_thws`` row: every frame of a clip attends to the others),
    the rotary table ``rope_freqs_cis`` (complex ``[n, Dh / 2]``, interleaved pairs), ``max_seqlen``
    and ``sequence_lengths`` (FlashInfer only, refused), computed once per call
    (``prepare_encoder_metadata``) and handed to every block. ``final_layernorm`` and the temporal
    pooling (``tpool_patch_merger``) follow the last block, on the restored rows. Items: the
    ``grid_thws`` rows (an image, or a clip of ``t`` frames), patches row-major. The encoder
    CUDA-graph call (no ``grid_thws``) is refused.

    **Blocks.** ``x = x + wo(attn(norm0(x))); x = x + mlp(norm1(x))``, a fused ``wqkv``
    (``QKVParallelLinear``: the rank's heads as ``[q; k; v]``) and a row-parallel ``wo``. From the
    prune layer on, vLLM's own block runs on the kept rows with the kept segments, their rotary rows
    (the engine gathers the table's real and imaginary parts, ``BlockCall.position_embeddings``)
    and the kept ``max_seqlen``. The attention-stabilisation blocks run ``wqkv`` on every row
    (see the module docstring), reorder q's and k's head features for ``ngr_attention``'s
    ``rotate_half`` rotary (``interleaved_to_halves``), attend with the kept queries over every key
    of their segment, then ``wo`` (all-reduced under tensor parallelism) and the MLP.
    """

    name = "vllm_kimi_k25"
    TOWER_PARTS: tuple[str, ...] = ("encoder.blocks", "encoder.final_layernorm")
    BLOCK_PARTS: tuple[str, ...] = (
        "norm0",
        "norm1",
        "mlp",
        "wqkv",
        "wo",
        "attn.scale",
        "num_attention_heads_per_partition",
        "hidden_size_per_attention_head",
    )
    BLOCK_PARAMETERS: tuple[str, ...] = ("cu_seqlens", "rope_freqs_cis", "max_seqlen", "sequence_lengths")

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        missing = missing_parts(tower, self.TOWER_PARTS)
        if not missing and len(tower.encoder.blocks):
            block = tower.encoder.blocks[0]
            missing += missing_parts(block, self.BLOCK_PARTS)
            missing += missing_parameters(type(block).forward, self.BLOCK_PARAMETERS)
        require(tower, missing, self.name)
        return tower.encoder.blocks

    @staticmethod
    def _grid(args: tuple, kwargs: dict[str, Any]) -> list[list[int]]:
        """The call's ``grid_thws`` rows ``[t, h, w]`` (a tensor or a list)."""
        grid = kwargs["grid_thws"] if "grid_thws" in kwargs else (args[1] if len(args) > 1 else None)
        if grid is None:
            raise ValueError("IPCV needs the tower's grid_thws (a CUDA-graphed encoder call has none)")
        rows = grid.tolist() if isinstance(grid, torch.Tensor) else grid
        return [[int(v) for v in row] for row in rows]

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items: the ``grid_thws`` rows, ``t * h * w`` rows each."""
        return TowerCall([t * h * w for t, h, w in self._grid(args, kwargs)])

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each frame its own part, patches row-major (as transformers' Kimi-K2.5)."""
        return merge_unit_grid(self._grid(args, kwargs), 1)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        kwargs = dict(kwargs)
        values = [kwargs.pop(name) if name in kwargs else None for name in self.BLOCK_PARAMETERS]
        positional = list(args)
        for i, value in enumerate(values):  # the encoder passes cu_seqlens by position, the rest by keyword
            if value is None and positional:
                values[i] = positional.pop(0)
        cu_seqlens, rope_freqs_cis, max_seqlen, sequence_lengths = values
        if sequence_lengths is not None:
            raise ValueError("IPCV does not support vLLM's FlashInfer cuDNN ViT backend (sequence_lengths)")
        rotary = (rope_freqs_cis.real, rope_freqs_cis.imag)
        return BlockCall(cu_seqlens, rotary, tuple(positional), {"max_seqlen": max_seqlen, **kwargs})

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
        """vLLM's block on packed rows ``[N, D]``, the rotary rows ``(real, imag)`` ``[N, Dh / 2]``
        as its complex table again; returns ``[N, D]``."""
        kwargs = dict(call.kwargs)
        longest = kwargs.pop("max_seqlen")
        if max_seqlen is not None and longest is not None:
            longest = torch.tensor(max_seqlen, dtype=torch.int32, device=longest.device)
        real, imag = position_embeddings
        return forward(
            hidden,
            cu_seqlens.to(torch.int32),
            *call.args,
            rope_freqs_cis=torch.complex(real, imag),
            max_seqlen=longest,
            **kwargs,
        )

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
        """Queries of the kept rows, keys / values of every row of ``full`` ``[n, D]``; returns
        the kept rows ``[Nk, D]`` of the block's output."""
        heads, head_dim = block.num_attention_heads_per_partition, block.hidden_size_per_attention_head
        qkv, _ = block.wqkv(block.norm0(full))  # every row: see the module docstring
        q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)
        order = interleaved_to_halves(head_dim, full.device)
        attended = ngr_attention(
            q[plan.keep][..., order],
            k[..., order],
            v,
            kept_cu_seqlens,
            call.cu_seqlens.to(torch.int32),
            softmax_scale=block.attn.scale,
            backend=config.attention_backend,
            rotary=full_width_rotary(*call.position_embeddings),
            q_positions=plan.keep,
            skip_check=True,
        )
        projected, _ = block.wo(attended.reshape(kept.shape[0], -1))
        hidden = kept + projected
        return hidden + block.mlp(block.norm1(hidden))


class VLLMInternVLAdapter(TiledTowerAdapter):
    """vLLM's ``InternS1VisionModel`` (``interns1_vit``), the tower of
    ``InternS1ForConditionalGeneration``, which vLLM's registry also maps transformers' native
    InternVL format (``InternVLForConditionalGeneration``) to: InternViT as in transformers.

    **Batched tiles, CLS pinned.** As the Hugging Face InternVL adapter: the layers take
    ``[tiles, 1 + N, D]`` with dense attention inside each tile; from the prune layer on they
    receive and return packed kept rows and run the functional pre-norm layer on this layer's
    parts (``layer_parts``); every tile's CLS row is pinned. The last layer restores the full
    sequence, so the final norm, the CLS split, ``pixel_shuffle`` and the projector
    (``extract_feature``) run as usual, and every placeholder count is unchanged. vLLM's
    ``q_proj`` / ``k_proj`` / ``v_proj`` / ``projection_layer`` are plain ``nn.Linear`` and its
    MLP goes through its own ``fc1`` / ``fc2`` layers: no weight is read directly. Under tensor
    parallelism the attention projections are replicated (every rank computes every head) and
    ``fc2`` (row-parallel) all-reduces, as in vLLM's own layer.

    **Items: what vLLM's call allows.** vLLM encodes all tiles of every image of a batch in one
    tower call (``extract_feature``); the tiles per image are known one level up,
    ``_process_vision_input(image_input)``'s ``num_patches`` (the processor's
    ``image_num_patches``: tiles per image, thumbnail included). A wrapper of that method hands
    them to the tower call inside (``hints["tiles_per_image"]``, this call only), so each image's
    tiles form one item, as the Hugging Face adapter reads them from ``input_ids``. For a video,
    ``num_patches`` counts frames (one tile each) and each frame is one item, as in transformers,
    where every frame is its own run of image tokens. A bare tower call treats its tiles as one
    item.

    **Read layer.** ``InternS1ForConditionalGeneration`` reads the tower's last output (it builds
    every layer and has no ``vision_feature_layer``): the default read block.
    """

    name = "vllm_internvl"
    LAYER_PARTS: tuple[str, ...] = (
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.projection_layer",
        "attention.qk_normalization",
        "attention.num_heads",
        "attention.head_dim",
        "attention.scale",
        "layernorm_before",
        "layernorm_after",
        "mlp",
        "lambda_1",
        "lambda_2",
    )

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        missing = missing_parts(tower, ("encoder.layer", "embeddings.patch_embeddings.patch_size"))
        if not missing and len(tower.encoder.layer):
            missing += missing_parts(tower.encoder.layer[0], self.LAYER_PARTS)
        if self.model is not None:  # install_hooks wraps it; checked before anything is patched
            missing += missing_parts(self.model, ("_process_vision_input",))
        require(tower, missing, self.name)
        return tower.encoder.layer

    def patch_size(self, tower: nn.Module) -> tuple[int, int]:
        return tuple(tower.embeddings.patch_embeddings.patch_size)

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap the model's ``_process_vision_input`` (required: without it each image's tiles
        could not be told apart, see the class)."""
        if self.model is not None:
            patch.wrap(self.model, "_process_vision_input", functools.partial(self._read_tiles, patch))

    def _read_tiles(self, patch: IPCVPatch, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``_process_vision_input`` telling its tower call the tiles of each item."""

        def process_vision_input(vision_input: Any) -> Any:
            if vision_input["type"] not in ("pixel_values", "pixel_values_videos"):
                return inner(vision_input)  # precomputed embeddings: no tower call
            counts = [int(count) for count in vision_input["num_patches"]]
            if vision_input["type"] == "pixel_values_videos":
                counts = [1] * sum(counts)
            with patch.hinted(tiles_per_image=counts):
                return inner(vision_input)

        return process_vision_input

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        """``InternS1VisionLayer``: ``q_norm`` / ``k_norm`` (vLLM's ``RMSNorm``) only with
        ``use_qk_norm``, layer scales ``lambda_1`` / ``lambda_2``."""
        attention = block.attention
        q, k = attention.q_proj, attention.k_proj
        if attention.qk_normalization:
            q, k = (lambda x: attention.q_norm(attention.q_proj(x))), (lambda x: attention.k_norm(attention.k_proj(x)))
        return PrenormLayer(
            norm1=block.layernorm_before,
            q=q,
            k=k,
            v=attention.v_proj,
            out=attention.projection_layer,
            norm2=block.layernorm_after,
            mlp=block.mlp,
            num_heads=attention.num_heads,
            head_dim=attention.head_dim,
            scale=attention.scale,
            attn_gain=block.lambda_1,
            mlp_gain=block.lambda_2,
        )


class VLLMInternVLChatAdapter(VLLMInternVLAdapter):
    """vLLM's ``InternVisionModel`` (``intern_vit``), the tower of ``InternVLChatModel``: the
    OpenGVLab checkpoints' own format (``OpenGVLab/InternVL2-*``, ``InternVL2_5-*``,
    ``InternVL3-*``, loaded with ``trust_remote_code``). Items, CLS pinning, the read layer and
    ``_process_vision_input``'s tiles as ``VLLMInternVLAdapter``; what differs is the layer.

    **Layer.** ``InternVisionEncoderLayer``: ``x + ls1 * attn(norm1(x))``,
    ``x + ls2 * mlp(norm2(x))``, with one fused ``qkv`` (``QKVParallelLinear``, whose weights
    vLLM repacks on the CPU: it runs on every row, see ``PrenormLayer``), optional QK RMSNorm over
    all heads, and ``proj`` (row-parallel). ``InternVLChatModel`` builds only the layers up to
    its ``select_layer``, so the tower's last layer is the read layer.

    **Tensor parallelism.** ``qkv`` gives this rank's heads ``[q | k | v]``; the QK norm goes
    through the attention's own ``_apply_qk_norm`` (all-gather, norm over every head, split back,
    as vLLM's layer does); ``ngr_attention`` runs on the rank's heads (dummy heads included:
    their weights are zero, so is their output); ``proj`` and ``fc2`` all-reduce. vLLM's
    ``mm_encoder_tp_mode="data"`` shards the tiles *inside* the tower call (each rank encodes a
    slice of them), below what the patch sees as one call: refused when the patch is made.
    """

    name = "vllm_internvl_chat"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if getattr(tower, "use_data_parallel", False):
            raise ValueError(
                "IPCV does not support mm_encoder_tp_mode='data' for InternVL's InternViT (the tower "
                "shards its tiles across ranks inside one call): use the default mm_encoder_tp_mode"
            )
        missing = missing_parts(tower, ("encoder.layers", "embeddings.patch_size"))
        if self.model is not None:  # install_hooks wraps it; checked before anything is patched
            missing += missing_parts(self.model, ("_process_vision_input",))
        require(tower, missing, self.name)
        layers = tower.encoder.layers
        needed = ["attn.qkv", "attn.proj", "attn.num_heads_per_partition", "norm1", "norm2", "mlp", "ls1", "ls2"]
        if layers and getattr(layers[0].attn, "qk_normalization", False):
            needed.append("attn._apply_qk_norm")
        if layers:
            require(layers[0], missing_parts(layers[0], needed), self.name)
        return layers

    def patch_size(self, tower: nn.Module) -> tuple[int, int]:
        size = tower.embeddings.patch_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        attention = block.attn

        def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            projected, _ = attention.qkv(x)
            q, k, v = projected.chunk(3, dim=-1)
            if attention.qk_normalization:
                q, k = attention._apply_qk_norm(q, k)
            return q, k, v

        return PrenormLayer(
            norm1=block.norm1,
            q=None,
            k=None,
            v=None,
            qkv=qkv,
            out=lambda x: attention.proj(x)[0],
            norm2=block.norm2,
            mlp=block.mlp,
            num_heads=attention.num_heads_per_partition,
            head_dim=attention.head_dim,
            scale=attention.scale,
            attn_gain=block.ls1,
            mlp_gain=block.ls2,
        )


class VLLMClipViTAdapter(ClipViTAdapter):
    """vLLM's ``CLIPVisionModel`` (``clip.py``): the ``vision_tower`` of LLaVA 1.5 and LLaVA-NeXT.

    **What vLLM builds.** ``init_vision_tower_for_llava`` builds the tower only up to the deepest
    layer the model reads (``vision_feature_layer``, LLaVA's -2: ``depth - 1`` layers), without
    ``post_layernorm``: for one read layer the tower's last layer is it, the default read block,
    and the skipped layers do not exist. Depth-dependent settings (``prune_layer < depth``) count
    the layers vLLM built. With a list of read layers vLLM passes ``select_layers`` to the tower
    call (indices into the full tower's ``hidden_states``): each of those blocks returns the
    restored sequence. The tower's forward runs its embeddings (CLS first), its layers on
    ``[crops, 1 + N, D]``, then ``resolve_visual_encoder_outputs``, which drops CLS
    (``vision_feature_select_strategy="default"``); every read layer restores every row before
    that step, so what follows is unchanged and every placeholder count stays vLLM's.

    **Items.** As the Hugging Face adapter: a bare tower call makes each crop (``pixel_values``
    ``[B, 3, S, S]``) one item, CLS pinned (LLaVA 1.5 encodes one crop per image). For anyres
    models (LLaVA-NeXT, OneVision: ``image_grid_pinpoints``) a wrapper of the model's
    ``_process_image_pixels(inputs)`` tells the tower call the crops of each image: its base
    crop and the crops of its best-fitting resolution, ``get_anyres_image_grid_shape`` of its
    ``image_sizes`` row plus one, as vLLM counts them, form one item; crops beyond that count
    (vLLM pads the crops of a prompt's images to one count when it stacks them) are items of
    their own, whose features vLLM discards. A wrapper of ``_process_video_pixels`` makes all
    frames of one video one item (OneVision).

    **Layer.** ``CLIPEncoderLayer``: ``layer_norm1``, ``self_attn.qkv_proj`` (fused
    ``QKVParallelLinear``, ``[q | k | v]`` of the rank's heads, weights repacked on the CPU: it
    runs on every row, see ``PrenormLayer``), ``self_attn.out_proj`` (row-parallel: all-reduces
    under tensor parallelism), ``layer_norm2``, ``mlp`` (vLLM's ``fc1`` / ``fc2``).
    """

    name = "vllm_clip_vit"
    # vLLM's SigLIP layers return ``(hidden_states, None)`` (``VLLMSiglipAdapter``).
    pair_outputs = False
    # What the adapter goes through (a vLLM without one of them is refused when the patch is made).
    TOWER_PARTS: tuple[str, ...] = (
        "vision_model.embeddings",
        "vision_model.encoder.layers",
        "vision_model.config.patch_size",
        "vision_model.config.num_hidden_layers",
    )
    LAYER_PARTS: tuple[str, ...] = (
        "layer_norm1",
        "layer_norm2",
        "mlp",
        "self_attn.qkv_proj",
        "self_attn.out_proj",
        "self_attn.num_heads_per_partition",
        "self_attn.head_dim",
        "self_attn.scale",
    )

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        missing = missing_parts(tower, self.TOWER_PARTS)
        layers = tower.vision_model.encoder.layers if not missing else None
        if layers:
            missing += missing_parts(layers[0], self.LAYER_PARTS)
        missing += missing_parts(self.model, self._model_methods(tower)) if self.model is not None else []
        require(tower, missing, self.name)
        vision_model = tower.vision_model
        # CLIP's embeddings prepend a CLS token (a learned class embedding); SigLIP's do not.
        self.has_cls = hasattr(vision_model.embeddings, "class_embedding")
        self._patch_size = vision_model.config.patch_size
        self._full_depth = vision_model.config.num_hidden_layers
        self._built_depth = len(layers)
        return layers

    def _model_methods(self, tower: nn.Module) -> tuple[str, ...]:
        """The model's methods ``install_hooks`` wraps: anyres models' ``_process_image_pixels``
        (the crops of each image), OneVision's ``_process_video_pixels`` (the frames of each video)."""
        model = self.model
        if model is None or getattr(model, "vision_tower", None) is not tower:
            return ()
        methods = []
        if getattr(model.config, "image_grid_pinpoints", None):
            methods.append("_process_image_pixels")
        if getattr(model.config, "video_token_index", getattr(model.config, "video_token_id", None)) is not None:
            methods.append("_process_video_pixels")
        return tuple(methods)

    def install_hooks(self, patch: IPCVPatch) -> None:
        if self.pair_outputs:
            for block in patch.blocks:
                patch.wrap(block, "forward", _as_pair)
        methods = self._model_methods(patch.tower)  # present: checked in ``blocks``
        if "_process_image_pixels" in methods:
            patch.wrap(
                self.model, "_process_image_pixels", functools.partial(self._read_image_crops, patch, self.model)
            )
        if "_process_video_pixels" in methods:
            patch.wrap(self.model, "_process_video_pixels", functools.partial(self._read_video_frames, patch))

    def _read_image_crops(self, patch: IPCVPatch, model: nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``_process_image_pixels(inputs)`` telling its tower call the crops of each image."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        def process_image_pixels(inputs: Any) -> Any:
            pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
            crops = [int(image.shape[0]) for image in pixel_values]  # per image, padding included
            if image_sizes is None:
                return inner(inputs)  # vLLM's own default: one crop per image
            counts: list[int] = []
            pinpoints, side = model.config.image_grid_pinpoints, model.config.vision_config.image_size
            for size, given in zip(image_sizes, crops, strict=True):
                rows, columns = get_anyres_image_grid_shape([int(v) for v in size], pinpoints, side)
                real = min(given, rows * columns + 1)
                counts += [real] + [1] * (given - real)
            with patch.hinted(sequences_per_image=counts):
                return inner(inputs)

        return process_image_pixels

    @staticmethod
    def _read_video_frames(patch: IPCVPatch, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``_process_video_pixels(inputs)`` making all frames of each video one item."""

        def process_video_pixels(inputs: Any) -> Any:
            frames = [int(video.shape[0]) for video in inputs["pixel_values_videos"]]
            with patch.hinted(sequences_per_image=frames):
                return inner(inputs)

        return process_video_pixels

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """``ClipViTAdapter``'s items and segments; the read blocks of vLLM's ``select_layers``."""
        select = kwargs.get("select_layers")
        if select is not None:
            # hidden_states index h of the full tower: h >= 1 is block h - 1's output, h < 0 block
            # full + h (vLLM offsets negative indices by the layers it did not build).
            blocks = [h - 1 if h >= 0 else self._full_depth + h for h in select]
            if not all(0 <= b < self._built_depth for b in blocks):
                raise ValueError(f"IPCV cannot read select_layers {list(select)} (the embeddings, or unbuilt layers)")
            hints = {**hints, "read_blocks": tuple(sorted(set(blocks)))}
        return super().describe_call(tower, args, kwargs, hints)

    def layer_parts(self, block: nn.Module) -> PrenormLayer:
        attention = block.self_attn

        def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            projected, _ = attention.qkv_proj(x)
            return projected.chunk(3, dim=-1)

        return PrenormLayer(
            norm1=block.layer_norm1,
            q=None,
            k=None,
            v=None,
            qkv=qkv,
            out=lambda x: attention.out_proj(x)[0],
            norm2=block.layer_norm2,
            mlp=block.mlp,
            num_heads=attention.num_heads_per_partition,
            head_dim=attention.head_dim,
            scale=attention.scale,
        )


def _as_pair(inner: Callable[..., Any]) -> Callable[..., Any]:
    """``inner``'s output as vLLM's SigLIP layer returns it: ``(hidden_states, None)``."""

    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = inner(*args, **kwargs)
        return out if isinstance(out, tuple) else (out, None)

    return forward


class VLLMSiglipAdapter(VLLMClipViTAdapter):
    """vLLM's ``SiglipVisionModel`` (``siglip.py``): the ``vision_tower`` of Gemma 3, PaliGemma
    and LLaVA-OneVision. CLIP's layer names and fused ``qkv_proj``, no CLS token (nothing
    pinned). Gemma 3 and PaliGemma build every layer and read the tower's last output
    (``post_layernorm`` runs after the restored last layer); OneVision is built up to its read
    layer as LLaVA is.

    **Layer outputs.** vLLM's ``SiglipEncoderLayer`` returns ``(hidden_states, None)`` and the
    encoder unpacks it; the engine's layers from ``P`` on return a tensor, so every layer's
    patched forward is wrapped once more to return the pair.

    **Items.** Each crop of a bare call is one item, as in transformers: Gemma 3's pan-and-scan
    crops of one image (off by default: one crop per image) are separate items there too.
    OneVision's crops and frames: as ``VLLMClipViTAdapter``.
    """

    name = "vllm_siglip"
    pair_outputs = True


class VLLMIdefics3Adapter(Idefics3Adapter):
    """vLLM's ``Idefics2VisionTransformer`` (``idefics2_vision_model.py``): the
    ``model.vision_model`` of Idefics3 and SmolVLM. A padded batch of sub-images ``[B, L, D]``
    (no CLS) with ``patch_attention_mask`` ``[B, H/p, W/p]``, SigLIP's layer names, a fused
    ``qkv_proj`` (as ``VLLMClipViTAdapter``), every layer built, ``post_layernorm`` after the
    restored last layer.

    **Items.** vLLM knows what transformers' call does not: ``_process_image_pixels(inputs)``
    holds ``num_patches``, the sub-images of each image. A wrapper hands the tower call inside
    the real sub-images of each image (those not all zeros: ``image_pixels_to_features`` drops
    the others, as transformers does), so each image is one item, also in a prompt with several
    images (transformers needs ``ik.set_tiles_per_image`` for that).

    **Padding patches** (``patch_attention_mask`` false) are pinned as in transformers: always
    kept, not counted, never neighbours. Whether they serve as keys follows the tower:
    transformers masks them; vLLM 0.32's Idefics3 builds its tower with
    ``apply_encoder_attention_mask=False`` and attends to them, so the pruned layers do too
    (ratio 0 then equals unpatched vLLM; a call without padding equals transformers).
    """

    name = "vllm_idefics3"
    TOWER_PARTS: tuple[str, ...] = ("embeddings", "encoder.layers", "config.patch_size", "post_layernorm")
    LAYER_PARTS = VLLMClipViTAdapter.LAYER_PARTS
    layer_parts = VLLMClipViTAdapter.layer_parts

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if getattr(tower, "use_data_parallel", False):
            # vLLM 0.32 resets mm_encoder_tp_mode to "weights" for Idefics3 / SmolVLM (no
            # supports_encoder_tp_data): a vLLM that allows it would shard inside the tower call.
            raise ValueError(
                "IPCV does not support mm_encoder_tp_mode='data' for Idefics3's tower (it shards its sub-images "
                "across ranks inside one call): use the default mm_encoder_tp_mode"
            )
        missing = missing_parts(tower, self.TOWER_PARTS)
        layers = tower.encoder.layers if not missing else None
        if layers:
            missing += missing_parts(layers[0], self.LAYER_PARTS)
        if self.model is not None:  # install_hooks wraps it; checked before anything is patched
            missing += missing_parts(self.model, ("_process_image_pixels",))
        require(tower, missing, self.name)
        self.has_cls = False
        self._patch_size = tower.config.patch_size
        self._padding_is_key = not getattr(tower, "apply_encoder_attention_mask", False)
        return layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        if self.model is not None:
            patch.wrap(self.model, "_process_image_pixels", functools.partial(self._read_images, patch))

    @staticmethod
    def _read_images(patch: IPCVPatch, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``_process_image_pixels(inputs)`` telling its tower call the real sub-images of each image."""

        def process_image_pixels(inputs: Any) -> Any:
            counts = [int(n) for n in inputs["num_patches"]]
            real = (inputs["pixel_values"] != 0).flatten(1).any(-1)
            per_image = [int(part.sum()) for part in real.split(counts)]
            with patch.hinted(sub_images_per_image=[n for n in per_image if n]):
                return inner(inputs)

        return process_image_pixels

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        per_image = hints.get("sub_images_per_image")
        if per_image is not None:  # vLLM's images, given to transformers' rule as prompts of one image
            hints = {**hints, "sequences_per_image": per_image}
        return super().describe_call(tower, args, kwargs, hints)

    def key_rows(
        self, call: BlockCall, num_rows: int, cu_seqlens: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Every row a key where the tower does not mask its padding (see the class)."""
        if self._padding_is_key:
            return None, cu_seqlens
        return super().key_rows(call, num_rows, cu_seqlens)


class VLLMGemma4Adapter(Gemma4Adapter):
    """vLLM's Gemma 4 (``gemma4_mm.py``): transformers' own ``Gemma4VisionModel`` (built with
    ``AutoModel.from_config``, its linear layers replaced by vLLM's, which the layer's own
    ``Gemma4ClippableLinear`` calls as the model does), but vLLM embeds the patches itself and calls
    ``vision_tower.encoder(inputs_embeds, attention_mask, pixel_position_ids)`` on batches of
    images of equal patch count, then pools each image. The family table's tower path is
    therefore the encoder, which this adapter patches; its blocks, items (each batch row an image;
    a video's frames, which vLLM encodes as rows of such calls, are items of their own) and
    padding rows are ``Gemma4Adapter``'s.
    """

    name = "vllm_gemma4"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        layers = super().blocks(tower)
        parts = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp")
        parts += ("post_feedforward_layernorm",)
        parts += tuple(f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"))
        require(layers[0], missing_parts(layers[0], (*parts, "self_attn.v_norm", "self_attn.scaling")), self.name)
        return layers


class VLLMPixtralAdapter(FamilyAdapter):
    """vLLM's ``PixtralHFVisionModel`` (``pixtral.py``): the ``vision_tower`` of
    ``Mistral3ForConditionalGeneration`` (transformers' format of Mistral 3).

    **The call.** ``tower(pixel_values)``: a list of images ``[C, H, W]``, each at its own size,
    embedded and concatenated into one sequence ``[1, n, D]`` (no CLS, no ``[IMG_BREAK]`` rows);
    the blocks take it with ``cu_seqlens`` (one segment per image), ``max_seqlen`` and the 2-D
    rotary tables ``rotary_pos_emb_cos`` / ``_sin`` ``[n, Dh]`` (transformers' ``rotate_half``
    layout), all by position. Items: the images, in call order. vLLM builds the tower only up to
    ``vision_feature_layer`` (Mistral 3's ``-1``: every layer), so its last layer is the read one.

    **Blocks from the prune layer on** run vLLM's own layer on the kept rows with the shrunk
    ``cu_seqlens`` and the kept rotary rows. The attention-stabilisation blocks run the fused
    ``qkv_proj`` on every row (vLLM repacks its weights on the CPU: see the module docstring),
    ``ngr_attention`` with kept queries over every key of the same image (rotary on keys at every
    row, on queries at their kept positions), then ``o_proj`` (row-parallel: all-reduces under
    tensor parallelism) and the MLP. FlashInfer's cuDNN ViT backend (``sequence_lengths``) is
    refused.
    """

    name = "vllm_pixtral"
    TOWER_PARTS: tuple[str, ...] = ("transformer.layers", "config.patch_size")
    BLOCK_PARTS: tuple[str, ...] = (
        "attention_norm",
        "ffn_norm",
        "feed_forward",
        "attention.qkv_proj",
        "attention.o_proj",
        "attention.n_heads",
        "attention.head_dim",
    )
    BLOCK_PARAMETERS: tuple[str, ...] = (
        "rotary_pos_emb_cos",
        "rotary_pos_emb_sin",
        "cu_seqlens",
        "max_seqlen",
        "sequence_lengths",
    )

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        missing = missing_parts(tower, self.TOWER_PARTS)
        if not missing and len(tower.transformer.layers):
            block = tower.transformer.layers[0]
            missing += missing_parts(block, self.BLOCK_PARTS)
            missing += missing_parameters(type(block).forward, self.BLOCK_PARAMETERS)
        require(tower, missing, self.name)
        self._patch_size = int(tower.config.patch_size)
        return tower.transformer.layers

    def _grids(self, args: tuple, kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        images = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        if kwargs.get("select_layers") is not None:
            raise ValueError("IPCV does not support select_layers for vLLM's Pixtral tower (Mistral 3 passes none)")
        p = self._patch_size
        return [(int(image.shape[-2]) // p, int(image.shape[-1]) // p) for image in images]

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items: the images, ``rows * columns`` patches each (segments: the blocks' ``cu_seqlens``)."""
        return TowerCall([rows * cols for rows, cols in self._grids(args, kwargs)])

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each image its own part, patches row-major (as transformers' Pixtral)."""
        return token_grid([(1, rows, cols) for rows, cols in self._grids(args, kwargs)], cls=False)

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])

    def unpack(self, packed: torch.Tensor, layout: torch.Size) -> torch.Tensor:
        return packed.view(layout)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        kwargs = dict(kwargs)
        values = [kwargs.pop(name) if name in kwargs else None for name in self.BLOCK_PARAMETERS]
        positional = list(args)
        for i, value in enumerate(values):  # the tower passes them by position; accept keywords too
            if value is None and positional:
                values[i] = positional.pop(0)
        cos, sin, cu_seqlens, max_seqlen, sequence_lengths = values
        if sequence_lengths is not None:
            raise ValueError("IPCV does not support vLLM's FlashInfer cuDNN ViT backend (sequence_lengths)")
        return BlockCall(cu_seqlens, (cos, sin), tuple(positional), {"max_seqlen": max_seqlen, **kwargs})

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
        """vLLM's layer on packed rows ``[N, D]`` (given to it as ``[1, N, D]``); returns ``[N, D]``."""
        kwargs = dict(call.kwargs)
        longest = kwargs.pop("max_seqlen")
        if max_seqlen is not None and longest is not None:
            longest = torch.tensor(max_seqlen, dtype=torch.int32, device=longest.device)
        cos, sin = position_embeddings
        out = forward(hidden.unsqueeze(0), cos, sin, cu_seqlens.to(torch.int32), longest, None, **kwargs)
        return out.squeeze(0)

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
        """Queries of the kept rows, keys / values of every row of ``full`` ``[n, D]``; returns
        the kept rows ``[Nk, D]`` of the block's output."""
        attention = block.attention
        heads, head_dim = attention.n_heads, attention.head_dim
        qkv, _ = attention.qkv_proj(block.attention_norm(full))  # every row: see the module docstring
        q, k, v = (x.reshape(-1, heads, head_dim) for x in qkv.chunk(3, dim=-1))
        attended = ngr_attention(
            q[plan.keep],
            k,
            v,
            kept_cu_seqlens,
            call.cu_seqlens.to(torch.int32),
            softmax_scale=head_dim**-0.5,
            backend=config.attention_backend,
            rotary=call.position_embeddings,
            q_positions=plan.keep,
            skip_check=True,
        )
        projected, _ = attention.o_proj(attended.reshape(kept.shape[0], -1))
        hidden = kept + projected
        return hidden + block.feed_forward(block.ffn_norm(hidden))


class VLLMLlama4Adapter(Llama4Adapter):
    """vLLM's ``Llama4VisionModel`` (``mllama4.py``), the ``vision_model`` of
    ``Llama4ForConditionalGeneration``: transformers' tower (spec §5.15) in vLLM's layers.

    **The call.** ``vision_model(pixel_values [tiles, 3, S, S])``, each tile embedded as
    ``[patch_1 .. patch_N, CLS]`` (CLS last, pinned), the layers on ``[tiles, N + 1, D]`` with
    dense attention inside each tile; after them ``layernorm_post``, the CLS rows dropped and the
    pixel-shuffle ``vision_adapter``, which see the restored ``[tiles, N + 1, D]``. vLLM builds
    every layer; the tower's last output is read.

    **What is vLLM's.** Each layer is called with the hidden states alone and returns
    ``(hidden,)`` (a forward hook gives the encoder that tuple where the engine returns a tensor).
    Its attention has one ``qkv_proj`` (``QKVParallelLinear``: this rank's heads ``[q | k | v]``,
    run on every row since vLLM repacks its weights on the CPU, see ``PrenormLayer``) and applies
    the rotary itself, from ``rotary_emb.cos_sin_cache``: complex ``[N + 1, 1, Dh / 2]``, equal to
    transformers' ``freqs_ci`` (the CLS row's frequencies zero), shared by every layer (vLLM's
    ``get_rope`` builds one module). The adapter reads that table as transformers' adapter reads
    ``freqs_ci`` and rotates q and k of the rows a layer runs on with their own rows of it (a
    complex product in float32, as vLLM's ``forward_native``). ``o_proj`` and the MLP's ``fc2``
    are row-parallel: under tensor parallelism they all-reduce, as in vLLM's own layer.

    **Items: each image's tiles** (its global tile included). vLLM encodes all tiles of a batch
    of images in one tower call (``encode_image_chunks``); the tiles per image are known one level
    up, ``_process_image_input(image_input)``'s ``patches_per_image`` (from vLLM's processor). A
    wrapper of that method hands them to the tower call inside (``hints["tiles_per_image"]``, this
    call only), so an image's output never depends on what vLLM batched it with. A bare tower call
    makes all its tiles one item. ``mm_encoder_tp_mode="data"`` shards the tiles across ranks
    inside that call (``run_dp_sharded_vision_model``), below what the patch sees: refused when the
    patch is made; so are compiled and CUDA-graphed encoders (the plugin's ``check_engine_settings``).
    """

    name = "vllm_llama4"
    TOWER_PARTS: tuple[str, ...] = ("model.layers", "vision_adapter", "patch_size")
    LAYER_PARTS: tuple[str, ...] = (
        "input_layernorm",
        "post_attention_layernorm",
        "mlp",
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "self_attn.rotary_emb.cos_sin_cache",
        "self_attn.num_local_heads",
        "self_attn.head_dim",
        "self_attn.q_size",
        "self_attn.kv_size",
        "self_attn.scaling",
    )

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__(model)
        self._rotary: nn.Module | None = None  # the layers' shared rotary module (``blocks``)

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if getattr(self.model, "use_data_parallel", False):
            raise ValueError(
                "IPCV does not support mm_encoder_tp_mode='data' for Llama 4's vision model (it shards its tiles "
                "across ranks inside one call): use the default mm_encoder_tp_mode"
            )
        missing = missing_parts(tower, self.TOWER_PARTS)
        layers = tower.model.layers if not missing else None
        if layers:
            missing += missing_parts(layers[0], self.LAYER_PARTS)
        if self.model is not None:  # install_hooks wraps it; checked before anything is patched
            missing += missing_parts(self.model, ("_process_image_input",))
        require(tower, missing, self.name)
        rotary = layers[0].self_attn.rotary_emb if layers else None
        if any(layer.self_attn.rotary_emb is not rotary for layer in layers):
            raise TypeError(
                f"vLLM's {type(tower).__name__} gives its layers different rotary modules: IPCV's {self.name} "
                "adapter reads one table for every layer"
            )
        self._rotary = rotary
        return layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """The layers' tuple outputs, and the wrapper of ``_process_image_input`` (required: without
        it each image's tiles could not be told apart, see the class)."""
        for block in patch.blocks:
            patch.add_hook(block.register_forward_hook(tuple_output))
        if self.model is not None:
            patch.wrap(self.model, "_process_image_input", functools.partial(self._read_tiles, patch))

    @staticmethod
    def _read_tiles(patch: IPCVPatch, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``_process_image_input`` telling its tower call the tiles of each image."""

        def process_image_input(image_input: Any) -> Any:
            counts = [int(count) for count in image_input["patches_per_image"].tolist()]
            with patch.hinted(tiles_per_image=counts):
                return inner(image_input)

        return process_image_input

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        """The layer's rotary table (``rotary_emb.cos_sin_cache``, its ``freqs_ci``) packed as
        transformers' adapter packs ``freqs_ci``: ``(real, imag)`` rows ``[tiles * (N + 1), Dh / 2]``."""
        freqs = self._rotary.cos_sin_cache.to(state.segments.device)
        return super().parse_block_call(args, {**kwargs, "freqs_ci": freqs}, state)

    def layer_parts(
        self, block: nn.Module, query_rotary: Rotary | None = None, key_rotary: Rotary | None = None
    ) -> PrenormLayer:
        """vLLM's layer as a ``PrenormLayer`` with one fused ``qkv``. That projection runs on every
        row of the layer's context, so q and k are both rotated with ``key_rotary`` (the context
        rows' tables); ``PrenormLayer.project`` then picks the query rows, whose tables
        ``query_rotary`` holds (unused here)."""
        if key_rotary is None:
            raise ValueError("Llama 4 layers need the rotary tables of their rows")
        qkv_proj, out_proj, heads, head_dim, widths, scale = self.attention_parts(block.self_attn)

        def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            projected, _ = qkv_proj(x)
            q, k, v = projected.split(widths, dim=-1)
            q, k = (complex_rope(t.view(x.shape[0], heads, head_dim), *key_rotary).flatten(1) for t in (q, k))
            return q, k, v

        return PrenormLayer(
            norm1=block.input_layernorm,
            q=None,
            k=None,
            v=None,
            qkv=qkv,
            out=lambda x: out_proj(x)[0],
            norm2=block.post_attention_layernorm,
            mlp=block.mlp,
            num_heads=heads,
            head_dim=head_dim,
            scale=scale,
        )

    def attention_parts(self, attention: nn.Module) -> tuple[nn.Module, nn.Module, int, int, list[int], float]:
        """``(qkv_proj, o_proj, heads of this rank, head size, [q, k, v] widths, softmax scale)`` of
        vLLM's ``Llama4VisionAttention``."""
        widths = [attention.q_size, attention.kv_size, attention.kv_size]
        return (
            attention.qkv_proj,
            attention.o_proj,
            attention.num_local_heads,
            attention.head_dim,
            widths,
            attention.scaling,
        )


class VLLMMiniCPMVAdapter(VLLMIdefics3Adapter):
    """vLLM's MiniCPM-V 4.6 / 4.7 (``MiniCPMV4_6ForConditionalGeneration``,
    ``MiniCPMV4_7ForConditionalGeneration``, which derives from it; spec §5.14).

    **The tower vLLM builds.** Not transformers' packed ``MiniCPMV4_6VisionModel``: an
    ``Idefics2VisionTransformer`` (``vpm``, SigLIP layers with a fused ``qkv_proj``, padding keys
    masked: ``apply_encoder_attention_mask=True``), the window merger ``vit_merger`` and the
    ``merger`` beside it on the model. The model never calls the tower:
    ``get_vision_hidden_states(data, downsample_mode)`` embeds the slices as a padded batch
    ``[S, L, D]`` (one slice per row, ``L`` its longest slice), runs layers ``0 .. I``
    (``insert_layer_id``), ``vit_merger`` (each slice 2 x 2 merged, padded again to ``[S, L', D]``),
    the later layers, ``post_layernorm`` and ``merger``. That method is therefore the tower call
    (``IPCVPatch.wrap_tower_call``); a direct call of ``vpm`` is refused.

    **Items, padding.** Each slice (each ``tgt_sizes`` row) is one item, as in transformers; the
    rows past a slice's ``(h / 2)(w / 2)`` tokens (``h w`` in ``"4x"`` mode) are padding, pinned
    and never keys (``VLLMIdefics3Adapter``'s handling), so the plan over a slice's real rows is
    the one transformers makes over its packed rows (``reference_plan`` leaves the padding out, for
    comparisons with transformers). Blocks from ``P`` on run the functional
    SigLIP layer on packed kept rows; the last one restores ``[S, L', D]`` for ``post_layernorm``
    and the merger, which read each slice's real rows only.

    **Where IPCV applies:** from block ``I + 2`` on (``check_config``; also from the model
    configuration alone, ``check_model_config``, when vLLM validates its settings). Under tensor
    parallelism (``qkv_proj`` / ``out_proj`` / ``fc2`` sharded) every rank plans the same; with
    ``mm_encoder_tp_mode="data"`` the layers are replicated and each rank encodes every slice of
    its call (the model does not shard slices), so it needs no refusal.
    """

    name = "vllm_minicpmv"
    TOWER_PARTS: tuple[str, ...] = ("embeddings", "encoder.layers", "post_layernorm")
    MODEL_PARTS: tuple[str, ...] = ("vpm", "vit_merger", "merger", "get_vision_hidden_states", "config.insert_layer_id")

    @classmethod
    def check_model_config(cls, model_config: Any, config: IPCVConfig) -> None:
        """``prune_layer >= insert_layer_id + 2`` from ``MiniCPMV4_6Config`` / ``MiniCPMV4_7Config``."""
        check_prune_layer(int(model_config.insert_layer_id), config)

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        model = self.model
        if model is None or getattr(model, "vpm", None) is not tower:
            raise TypeError(
                "vLLM's MiniCPM-V tower is patched through its model (whose get_vision_hidden_states runs "
                "the tower's layers): apply IPCV to the MiniCPMV4_6ForConditionalGeneration, not to its vpm"
            )
        missing = missing_parts(tower, self.TOWER_PARTS) + missing_parts(model, self.MODEL_PARTS)
        layers = tower.encoder.layers if not missing else None
        if layers:
            missing += missing_parts(layers[0], self.LAYER_PARTS)
        require(tower, missing, self.name)
        self.has_cls = False
        self._insert_layer = int(model.config.insert_layer_id)
        self._downsample_mode = getattr(model.config, "downsample_mode", "16x")
        self._padding_is_key = not getattr(tower, "apply_encoder_attention_mask", False)
        return layers

    def check_config(self, tower: nn.Module, config: IPCVConfig) -> None:
        check_prune_layer(self._insert_layer, config)

    def install_hooks(self, patch: IPCVPatch) -> None:
        patch.wrap_tower_call(self.model, "get_vision_hidden_states")

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items: the slices, ``L'`` rows each as the blocks from ``P`` on see them (one segment
        per slice), the rows past each slice's tokens padding."""
        data = kwargs["data"] if "data" in kwargs else (args[0] if args else None)
        try:  # vLLM's MiniCPMVImagePixelInputs (a TensorSchema, read by key)
            target_sizes = data["tgt_sizes"]
        except (TypeError, KeyError, IndexError, AttributeError):
            target_sizes = None
        if not isinstance(target_sizes, torch.Tensor):
            raise ValueError(
                "vLLM's MiniCPM-V tower takes IPCV inside get_vision_hidden_states(data, downsample_mode); "
                "a direct call of its vpm is not supported"
            )
        mode = kwargs["downsample_mode"] if "downsample_mode" in kwargs else (args[1] if len(args) > 1 else None)
        merged = (mode or self._downsample_mode) != "4x" and self._insert_layer >= 0
        counts = [rows * cols for rows, cols in slice_grids((), {"target_sizes": target_sizes}, merged)]
        length = max(counts)
        device = target_sizes.device
        padding = torch.arange(length, device=device)[None, :] >= torch.tensor(counts, device=device)[:, None]
        segments = sequence_segments(len(counts), length, device)
        padded = padding.reshape(-1) if bool(padding.any()) else None
        return TowerCall([length] * len(counts), segments, padding=padded)

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Unknown: the padded layout has rows off every slice's grid (a selector that needs the
        grid, such as ``"uniform"``, refuses)."""
        return None

    def reference_plan(self, plan: IPCVPlan, padding: torch.Tensor | None) -> IPCVPlan:
        """The plan over transformers' packed slices: the padding rows vLLM adds left out."""
        return plan if padding is None else without_padding(plan, padding)
