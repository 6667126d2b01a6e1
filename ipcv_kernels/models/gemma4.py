"""Gemma 4 vision towers (``Gemma4VisionModel``), bare or inside ``Gemma4ForConditionalGeneration``
(and, in vLLM, the same transformers tower, whose encoder vLLM calls directly).

The tower takes a padded batch of variable-resolution images: ``pixel_values`` ``[B, L, C p^2]``
(each image's patches flattened, padded to the processor's patch budget ``L``) and
``pixel_position_ids`` int64 ``[B, L, 2]``, the ``(x, y)`` patch position of every row, ``(-1,
-1)`` on padding rows. Its blocks take the padded batch ``[B, L, D]`` with a bidirectional mask
that hides the padding keys, axial 2-D rotary tables ``(cos, sin)`` ``[B, L, Dh]`` from the
positions, per-head RMS norms of q / k / v and sandwich norms (a norm on the attention and MLP
outputs before each residual add); the softmax scale is 1 (the q / k norms take its place). After
the blocks, ``Gemma4VisionPooler`` zeroes the padding rows, averages ``k x k`` patches by their
positions and drops the padding: it must see every row (``docs/spec.md`` §5).

The adapter is an ``engine.batched`` one: from the prune layer on the blocks run on packed kept
rows through ``prenorm_layer`` (``ngr_attention`` per image), with the model's own norms and
projections and the rotary tables of the rows involved. Differences from CLIP / SigLIP:

- **Padding rows** (``pixel_position_ids == -1``) are the call's ``TowerCall.padding``, pinned
  like Idefics3's padding patches (always kept, not counted in the image's ``n``, never a
  neighbour) and never keys in any block, as the model masks them. Their own outputs are computed
  as the model computes them (the pooler zeroes them anyway).
- **Rotary.** Every block receives the tower's ``(cos, sin)`` for the full batch; the engine
  gathers the kept rows' tables (the pruned blocks) and the stabilisation blocks apply the
  queries' and keys' own rows of the full tables.
- **Items.** Each batch row (an image) is one item. Inside a full model, ``get_video_features``
  is wrapped: the frames of one video form one item (``num_frames_per_video`` of transformers >=
  5.19, which takes every video's frames along one axis; 5.17 takes ``[videos, frames, L, C p^2]``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import IPCVPatch, TowerCall
from ..engine.batched import BatchedBlockCall, BatchedTowerAdapter, PrenormLayer, prenorm_layer, sequence_segments
from ..engine.vision import BlockCall, ForwardState
from ..reference import IPCVPlan

Rotary = tuple[torch.Tensor, torch.Tensor]


def axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gemma 4's axial 2-D rotary on packed rows: ``x`` ``[N, H, Dh]``, ``cos`` / ``sin``
    ``[N, Dh]`` (the tower's tables of those rows). The head dimension splits into an ``x`` half
    and a ``y`` half, each rotated by ``rotate_half`` within itself (the model's
    ``apply_multidimensional_rope`` over 2 position dimensions)."""
    part = 2 * (x.shape[-1] // 4)
    pieces = []
    for start in (0, part):
        piece = x[..., start : start + part]
        c, s = cos[:, None, start : start + part], sin[:, None, start : start + part]
        first, second = piece[..., : part // 2], piece[..., part // 2 :]
        pieces.append(piece * c + torch.cat((-second, first), dim=-1) * s)
    return torch.cat(pieces, dim=-1)


def _positions(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """``pixel_position_ids`` ``[B, L, 2]`` of a tower (``pixel_values, pixel_position_ids``) or
    encoder (``inputs_embeds, attention_mask, pixel_position_ids``) call."""
    if "pixel_position_ids" in kwargs:
        positions = kwargs["pixel_position_ids"]
    elif "inputs_embeds" in kwargs or len(args) >= 3:  # the encoder, as vLLM calls it
        positions = args[2] if len(args) >= 3 else None
    else:
        positions = args[1] if len(args) >= 2 else None
    if positions is None:
        raise ValueError("IPCV needs the Gemma 4 tower's pixel_position_ids ([B, L, 2], -1 on padding)")
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"pixel_position_ids must be [B, L, 2], got shape {tuple(positions.shape)}")
    return positions


class Gemma4Adapter(BatchedTowerAdapter):
    """Gemma 4 encoder layers (``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` with ``q_norm`` /
    ``k_norm`` / ``v_norm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``, ``mlp``,
    ``post_feedforward_layernorm``); see the module docstring."""

    name = "gemma4"
    has_cls = False

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        # The tower (transformers) or its encoder (vLLM calls ``vision_tower.encoder`` itself).
        encoder = getattr(tower, "encoder", tower)
        if not hasattr(encoder, "layers") or not hasattr(encoder, "rotary_emb"):
            raise TypeError(f"the vision tower must be a Gemma4VisionModel or its encoder, got {type(tower).__name__}")
        return encoder.layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap ``get_video_features`` of the model holding the tower: a video's frames form one item."""
        for holder in self.model.modules() if self.model is not None else ():
            if getattr(holder, "vision_tower", None) is patch.tower and hasattr(holder, "get_video_features"):
                patch.wrap(holder, "get_video_features", functools.partial(self._read_videos, patch))

    def _read_videos(self, patch: IPCVPatch, inner: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(inner)

        def get_video_features(*args: Any, **kwargs: Any) -> Any:
            call = signature.bind_partial(*args, **kwargs).arguments
            frames = call.get("num_frames_per_video")
            videos = call.get("pixel_values_videos")
            if frames is not None:  # frames of all videos along one axis (transformers >= 5.19)
                counts = [int(count) for count in frames]
            elif videos is not None and videos.dim() == 4:  # [videos, frames, L, C p^2] (5.17)
                counts = [videos.shape[1]] * videos.shape[0]
            else:  # the model raises its own error
                return inner(*args, **kwargs)
            with patch.hinted(sequences_per_image=counts):
                return inner(*args, **kwargs)

        return get_video_features

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items (images, or a video's frames), one segment per batch row, padding rows."""
        positions = _positions(args, kwargs)
        rows, length = positions.shape[:2]
        counts = hints.get("sequences_per_image") or [1] * rows
        if sum(counts) != rows:
            raise ValueError(f"frames per video {counts} must add up to the call's {rows} rows")
        padding = (positions == -1).all(-1).reshape(-1)
        if not bool(padding.any()):  # nothing to mask: the plain path
            padding = None
        segments = sequence_segments(rows, length, positions.device)
        return TowerCall([count * length for count in counts], segments, padding=padding)

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each batch row its own part, at its ``(y, x)`` patch position (padding rows at -1)."""
        positions = _positions(args, kwargs)
        rows, length = positions.shape[:2]
        part = torch.arange(rows, device=positions.device).repeat_interleave(length)
        flat = positions.reshape(-1, 2).to(torch.int64)
        part = torch.where(flat[:, 0] < 0, -1, part)
        return torch.stack([part, flat[:, 1], flat[:, 0]], dim=1).cpu()

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        """The block's rotary tables ``[B, L, Dh]`` as packed rows ``[B * L, Dh]``."""
        kwargs = dict(kwargs)
        cos, sin = kwargs.pop("position_embeddings")
        # Every block gets the same tables: packed once per forward, so that the engine's memo of
        # their kept rows (keyed by the tensor) holds across blocks.
        memo = state.kept_rotary.get(("packed", id(cos)))
        if memo is None or memo[0] is not cos:
            memo = (cos, (cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])))
            state.kept_rotary[("packed", id(cos))] = memo
        return BatchedBlockCall(state.segments, memo[1], args, kwargs, state=state)

    def layer_parts(
        self, block: nn.Module, query_rotary: Rotary | None = None, key_rotary: Rotary | None = None
    ) -> PrenormLayer:
        """The parts of one layer, q rotated with ``query_rotary`` and k with ``key_rotary`` (the
        tables of the rows ``PrenormLayer.project`` gives them)."""
        if query_rotary is None or key_rotary is None:
            raise ValueError("Gemma 4 layers need the rotary tables of their query and key rows")
        attention = block.self_attn
        heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
        head_dim, groups = attention.head_dim, heads // kv_heads

        def heads_of(projection: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return projection(x).view(x.shape[0], -1, head_dim)

        def q(x: torch.Tensor) -> torch.Tensor:
            return axial_rope(attention.q_norm(heads_of(attention.q_proj, x)), *query_rotary).flatten(1)

        def k(x: torch.Tensor) -> torch.Tensor:
            rotated = axial_rope(attention.k_norm(heads_of(attention.k_proj, x)), *key_rotary)
            return rotated.repeat_interleave(groups, dim=1).flatten(1)  # the model's repeat_kv

        def v(x: torch.Tensor) -> torch.Tensor:
            return attention.v_norm(heads_of(attention.v_proj, x)).repeat_interleave(groups, dim=1).flatten(1)

        return PrenormLayer(
            norm1=block.input_layernorm,
            q=q,
            k=k,
            v=v,
            # Sandwich norms: the attention and MLP outputs are normalised before each residual add.
            out=lambda x: block.post_attention_layernorm(attention.o_proj(x)),
            norm2=block.pre_feedforward_layernorm,
            mlp=lambda x: block.post_feedforward_layernorm(block.mlp(x)),
            num_heads=heads,
            head_dim=head_dim,
            scale=attention.scaling,
        )

    def run_block(
        self,
        block: nn.Module,
        forward: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: Rotary | None,
        call: BlockCall,
        config: IPCVConfig,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """The layer on ``hidden``'s rows (all, or the kept ones; ``position_embeddings``: theirs)."""
        cu_seqlens = cu_seqlens.to(torch.int32)
        rows, cu_keys = self.key_rows(call, hidden.shape[0], cu_seqlens)
        cos, sin = position_embeddings
        keys = (cos, sin) if rows is None else (cos[rows], sin[rows])
        parts = self.layer_parts(block, (cos, sin), keys)
        return prenorm_layer(parts, hidden, hidden, None, cu_seqlens, cu_keys, config.attention_backend, rows)

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
        """Kept queries over every non-padding row of ``full``, each with its own rotary rows."""
        rows, cu_keys = self.key_rows(call, full.shape[0], call.cu_seqlens)
        cos, sin = call.position_embeddings
        keys = (cos, sin) if rows is None else (cos[rows], sin[rows])
        parts = self.layer_parts(block, (cos[plan.keep], sin[plan.keep]), keys)
        return prenorm_layer(parts, kept, full, plan.keep, kept_cu_seqlens, cu_keys, config.attention_backend, rows)
