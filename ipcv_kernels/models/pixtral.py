"""Pixtral vision tower (``PixtralVisionModel``), bare or inside Mistral 3
(``Mistral3ForConditionalGeneration``).

**The call.** ``tower(pixel_values [B, C, H, W], image_sizes [B, 2])``: every image is cut to its
own ``image_sizes`` (the batch is padded to the largest), embedded by ``patch_conv`` into
``(h / p) x (w / p)`` patches, and all images are concatenated into one sequence ``[1, n, D]``
(no CLS, no ``[IMG_BREAK]`` rows: those are text tokens the language model's input adds). The
blocks take that sequence with a block-diagonal additive ``attention_mask`` ``[1, 1, n, n]`` (one
block per image; under flash attention the mask is ``None`` and ``cu_seq_lens_q/k`` carry the
same segments) and 2-D axial rotary tables ``(cos, sin)`` ``[n, Dh]`` in ``rotate_half`` layout.

**Items and segments.** Each image is one item and one attention segment, in call order.

**The blocks from the prune layer on.** The engine's packed rows are the sequence's rows
(``pack`` drops the batch axis of one). Pruned blocks run the model's own layer on the kept rows
``[1, Nk, D]``, with the block-diagonal mask rebuilt over the kept segments (the images' kept
rows; the flash-attention kwargs likewise) and the kept rows of the rotary tables, so the
model's ``attn_implementation`` keeps deciding the kernel. The attention-stabilisation blocks
compute queries of the kept rows only over every row of the reconstructed sequence, per image,
through ``ngr_attention`` with the rotary applied to keys at every row and queries at their kept
positions; where nothing was dropped (ratio 0) their queries are every row and the model's own
layer runs, so ratio 0 is the unpatched tower exactly.

**Read layers.** Mistral 3 (and LLaVA) read ``hidden_states[vision_feature_layer]`` of the
tower (``get_image_features``, the argument else the config; the checkpoints use ``-1``): each
read block returns the restored full ``[1, n, D]`` and the blocks after the last one are
skipped. What follows (Mistral 3's RMSNorm, the 2 x 2 patch merger per image, the projector)
sees every token.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import BlockCall, FamilyAdapter, ForwardState, IPCVPatch, TowerCall, read_blocks
from ..ops import ngr_attention
from ..reference import IPCVPlan
from ..selectors import token_grid

# transformers' flash-attention kwargs that carry Pixtral's per-image segments.
FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def block_diagonal_mask(cu_seqlens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The additive ``[1, 1, n, n]`` mask of transformers' ``generate_block_attention_mask``:
    ``0`` inside each segment of ``cu_seqlens`` (int ``[S + 1]``), the dtype's minimum elsewhere
    (``like``: a tensor of the rows' dtype and device)."""
    bounds = cu_seqlens.tolist()
    n = bounds[-1]
    mask = torch.full((n, n), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    for start, end in itertools.pairwise(bounds):
        mask[start:end, start:end] = 0
    return mask[None, None]


def image_grids(
    pixel_values: torch.Tensor, image_sizes: torch.Tensor | list | None, patch_size: int
) -> list[tuple[int, int]]:
    """``(rows, columns)`` of patches of every image of a ``tower(pixel_values, image_sizes)`` call."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got shape {tuple(pixel_values.shape)}")
    if image_sizes is None:
        batch, _, height, width = pixel_values.shape
        sizes = [(height, width)] * batch
    else:
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
    if len(sizes) != pixel_values.shape[0]:
        raise ValueError(f"image_sizes has {len(sizes)} rows for {pixel_values.shape[0]} images")
    return [(int(h) // patch_size, int(w) // patch_size) for h, w in sizes]


@dataclass
class PixtralBlockCall(BlockCall):
    """A Pixtral layer call: whether the tower passed flash-attention segments instead of a mask."""

    flash: bool = False


class PixtralAdapter(FamilyAdapter):
    """``PixtralVisionModel``'s ``PixtralAttentionLayer`` blocks; see the module docstring."""

    name = "pixtral"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "transformer") or not hasattr(tower, "patch_conv"):
            raise TypeError(f"the vision tower must be a PixtralVisionModel, got {type(tower).__name__}")
        self._patch_size = int(tower.patch_size)
        return tower.transformer.layers

    # -- the call ---------------------------------------------------------------------------------
    def install_hooks(self, patch: IPCVPatch) -> None:
        """Wrap ``get_image_features`` of the model holding the tower: it tells the tower call the
        blocks it reads (``vision_feature_layer``)."""
        for holder in self.model.modules() if self.model is not None else ():
            if getattr(holder, "vision_tower", None) is patch.tower and hasattr(holder, "get_image_features"):
                patch.wrap(holder, "get_image_features", functools.partial(self._read_image_call, patch, holder))

    @staticmethod
    def _read_image_call(patch: IPCVPatch, holder: nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(inner)

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            layers = signature.bind_partial(*args, **kwargs).arguments.get("vision_feature_layer")
            if layers is None:
                layers = getattr(holder.config, "vision_feature_layer", -1)
            with patch.hinted(read_blocks=read_blocks(layers, patch.depth)):
                return inner(*args, **kwargs)

        return get_image_features

    def _grids(self, args: tuple, kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        image_sizes = kwargs["image_sizes"] if "image_sizes" in kwargs else (args[1] if len(args) > 1 else None)
        return image_grids(pixel_values, image_sizes, self._patch_size)

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items: the images (``rows * columns`` patches each), one attention segment each."""
        lengths = [rows * cols for rows, cols in self._grids(args, kwargs)]
        device = (kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]).device
        segments = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device, torch.int32)
        return TowerCall(lengths, segments, hints.get("read_blocks"))

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each image its own part, patches row-major."""
        return token_grid([(1, rows, cols) for rows, cols in self._grids(args, kwargs)], cls=False)

    # -- the blocks ---------------------------------------------------------------------------------
    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1])

    def unpack(self, packed: torch.Tensor, layout: torch.Size) -> torch.Tensor:
        return packed.view(layout)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        """``layer(hidden [1, n, D], attention_mask, position_embeddings=(cos, sin), **flash)``:
        the segments are the call's images (the mask and flash kwargs are rebuilt per use)."""
        kwargs = dict(kwargs)
        kwargs.pop("attention_mask", None)
        args = args[1:]  # the attention mask, passed by position
        flash = any(kwargs.pop(name, None) is not None for name in FLASH_KWARGS)
        position_embeddings = kwargs.pop("position_embeddings", None)
        if position_embeddings is None and args:
            position_embeddings, args = args[0], args[1:]
        return PixtralBlockCall(state.segments, position_embeddings, args, kwargs, flash=flash)

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
        """The model's layer on rows ``[N, D]`` (given as ``[1, N, D]``) in segments ``cu_seqlens``:
        a block-diagonal mask over them, or the flash kwargs; returns ``[N, D]``."""
        kwargs = dict(call.kwargs)
        cu_seqlens = cu_seqlens.to(device=hidden.device, dtype=torch.int32)
        if isinstance(call, PixtralBlockCall) and call.flash:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            kwargs.update(
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen
            )
            mask = None
        else:
            mask = block_diagonal_mask(cu_seqlens, hidden)
        out = forward(hidden.unsqueeze(0), mask, *call.args, position_embeddings=position_embeddings, **kwargs)
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
        """Queries of the kept rows ``[Nk, D]`` over keys / values of every row of ``full``
        ``[n, D]``, per image; returns the block's output at the kept rows ``[Nk, D]``."""
        if plan.drop.shape[0] == 0:  # nothing dropped: every row is a query, the model's own layer
            # The class's forward: the instance's is the patch's wrapper.
            forward = functools.partial(type(block).forward, block)
            return self.run_block(block, forward, full, call.cu_seqlens, call.position_embeddings, call, config)[
                plan.keep
            ]
        attention = block.attention
        heads, head_dim = attention.num_heads, attention.head_dim
        normed = block.attention_norm(full)
        q = attention.q_proj(normed.index_select(0, plan.keep)).view(-1, heads, head_dim)
        k = attention.k_proj(normed).view(-1, heads, head_dim)
        v = attention.v_proj(normed).view(-1, heads, head_dim)
        rotary = call.position_embeddings
        attended = ngr_attention(
            q,
            k,
            v,
            kept_cu_seqlens,
            call.cu_seqlens.to(device=full.device, dtype=torch.int32),
            softmax_scale=attention.scaling,
            backend=config.attention_backend,
            rotary=rotary,
            q_positions=None if rotary is None else plan.keep,
            skip_check=True,
        )
        hidden = kept + attention.o_proj(attended.reshape(kept.shape[0], -1))
        return hidden + block.feed_forward(block.ffn_norm(hidden))
