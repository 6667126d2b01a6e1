"""Llama 4 vision towers (``Llama4VisionModel``, at ``Llama4ForConditionalGeneration.vision_model``).

The tower takes fixed-size tiles ``pixel_values`` ``[tiles, 3, S, S]`` (an image: its tiles and,
when there are several, a global tile of the whole image), embeds each as ``[patch_1 .. patch_N,
CLS]`` (the CLS token appended **last**), adds a learned position embedding and runs pre-norm
LayerNorm layers (biased ``q/k/v/o``, GELU MLP) over the batch ``[tiles, N + 1, D]`` with dense
attention inside each tile. Its rotary is 2-D and stored as complex numbers, ``freqs_ci``
``[N + 1, 1, Dh / 2]`` (the CLS row's frequencies are zero: it is not rotated), the same for every
tile, and applied in float32 whatever the tower's dtype. After the blocks: the final LayerNorm,
the CLS row dropped, and a pixel-shuffle MLP (``vision_adapter``) over each tile's ``sqrt(N) x
sqrt(N)`` grid, which must see every patch row (``docs/spec.md`` §5).

The adapter is a ``TiledTowerAdapter`` (``engine.batched``): from the prune layer on the blocks run
on packed kept rows through ``prenorm_layer`` (``ngr_attention`` per tile) with the model's own
norms and projections. Differences from InternViT:

- **CLS last.** Every tile's CLS row is its last row: it is pinned there (always kept, not counted
  in the image's ``n``, never a neighbour).
- **Rotary.** Every block receives the tower's ``freqs_ci``; it is packed as ``(real, imag)`` tables
  ``[tiles * (N + 1), Dh / 2]`` (one per row, repeated per tile), whose kept rows the engine
  gathers, and applied as the model applies it (complex multiply in float32).
- **Block calls.** The encoder calls each layer by keyword (``hidden_state=``) and reads
  ``layer_outputs[0]``: forward pre-hooks hand the engine the hidden states positionally, and
  forward hooks give the encoder a one-element tuple where the engine returns a tensor.
- **Items.** ``get_image_features`` receives the flat tiles only; a wrapper of the model's forward
  (and ``generate``) reads every image's tile count from ``input_ids``: the processor writes an
  image as ``<|image_start|> .. <|image_end|>`` holding ``tokens_per_tile`` image (``<|patch|>``)
  tokens per tile, so each such span is one image (item). A bare tower call makes all its tiles
  one item, unless the call is hinted (``tiles_per_image``).
- ``scope="authors"`` is ``"global"`` here (the paper's authors ran no Llama 4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..engine import IPCVPatch
from ..engine.batched import BatchedBlockCall, BatchedTowerAdapter, PrenormLayer, TiledTowerAdapter, prenorm_layer
from ..engine.vision import BlockCall, ForwardState
from ..reference import IPCVPlan
from ..selectors import token_grid

Rotary = tuple[torch.Tensor, torch.Tensor]


def complex_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama 4's vision rotary on packed rows, as ``vision_apply_rotary_emb`` computes it.

    Args:
        x: ``[N, H, Dh]`` queries or keys.
        cos, sin: float32 ``[N, Dh / 2]``, the real and imaginary parts of the rows' ``freqs_ci``.

    Returns:
        ``[N, H, Dh]`` in ``x``'s dtype: consecutive pairs of ``x`` (in float32) as complex numbers
        times ``cos + i sin``.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(2)
    return rotated.type_as(x)


def image_tile_counts_between(
    input_ids: torch.Tensor, image_token_id: int, start_id: int, end_id: int, num_tiles: int
) -> list[int] | None:
    """Tiles of every image of a prompt batch, in the order the model scatters image features.

    Each ``start_id .. end_id`` span of a row of ``input_ids`` (int ``[B, S]``) is one image; its
    tile count is its ``image_token_id`` tokens over the tokens per tile (``total image tokens /
    num_tiles``). ``None`` when the spans do not pair up or do not divide into whole tiles.
    """
    counts: list[int] = []
    for row in input_ids.tolist():
        inside, tokens = False, 0
        for token in row:
            if token == start_id:
                if inside:
                    return None
                inside, tokens = True, 0
            elif token == end_id:
                if not inside:
                    return None
                inside = False
                counts.append(tokens)
            elif inside and token == image_token_id:
                tokens += 1
        if inside:
            return None
    total = sum(counts)
    if num_tiles <= 0 or total == 0 or total % num_tiles:
        return None
    per_tile = total // num_tiles
    if any(count % per_tile or count == 0 for count in counts):
        return None
    return [count // per_tile for count in counts]


def _hidden_positional(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: the encoder's ``layer(hidden_state=x, ...)`` as ``layer(x, ...)``."""
    if not args and "hidden_state" in kwargs:
        kwargs = dict(kwargs)
        return (kwargs.pop("hidden_state"),), kwargs
    return args, kwargs


def tuple_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: a tensor the engine returned, as the one-element tuple the encoder indexes."""
    return (output,) if isinstance(output, torch.Tensor) else output


class Llama4Adapter(TiledTowerAdapter):
    """Llama 4 encoder layers (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp``); see the module docstring."""

    name = "llama4"
    cls_last = True

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__(model)
        # ``set_tiles_per_image``: a setting of this patch for bare tower calls (not per call).
        self.tiles_per_image: list[int] | None = None

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        if not hasattr(tower, "vision_adapter") or not hasattr(getattr(tower, "model", None), "layers"):
            raise TypeError(f"the Llama 4 vision tower must be a Llama4VisionModel, got {type(tower).__name__}")
        return tower.model.layers

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Block calls by keyword and tuple outputs (module docstring), and the wrappers of the
        model's forward / ``generate`` reading the tiles per image from ``input_ids``."""
        for block in patch.blocks:
            patch.add_hook(block.register_forward_pre_hook(_hidden_positional, with_kwargs=True))
            patch.add_hook(block.register_forward_hook(tuple_output))
        holders = (
            [m for m in self.model.modules() if getattr(m, "vision_model", None) is patch.tower] if self.model else []
        )
        for holder in holders:
            patch.wrap(holder, "forward", functools.partial(self._read_prompt_tiles, patch, holder))
            if hasattr(holder, "generate"):
                # Recent transformers encode the images before the prefill forward (``get_image_features``
                # with the pixels alone), so generate's own arguments give the counts for that call.
                patch.wrap(holder, "generate", functools.partial(self._read_prompt_tiles, patch, holder))

    def _read_prompt_tiles(self, patch: IPCVPatch, holder: nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        """``inner`` (``holder.forward`` or ``generate``) reading the tile counts from its arguments."""
        config = holder.config

        def call(*args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
            tiles = None
            if isinstance(input_ids, torch.Tensor) and isinstance(pixel_values, torch.Tensor):
                tiles = image_tile_counts_between(
                    input_ids, config.image_token_id, config.boi_token_index, config.eoi_token_index,
                    pixel_values.shape[0],
                )  # fmt: skip
            if tiles is None:
                return inner(*args, **kwargs)
            with patch.hinted(tiles_per_image=tiles):
                return inner(*args, **kwargs)

        return call

    # -- one tower call -------------------------------------------------------------------------
    def patch_size(self, tower: nn.Module) -> tuple[int, int]:
        return (tower.patch_size, tower.patch_size)

    def tiles_per_item(self, hints: dict[str, Any], num_tiles: int) -> list[int]:
        return hints.get("tiles_per_image") or self.tiles_per_image or [num_tiles]

    def pinned_rows(self, cu_seqlens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        """Every tile's CLS row: its last."""
        if padding is not None:
            raise ValueError("the llama4 adapter has no padding rows to pin")
        return cu_seqlens[1:].to(torch.int64) - 1

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """Each tile its own part: its patches row-major, then its CLS row off the grid."""
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        num_tiles, _, height, width = pixel_values.shape
        patch_h, patch_w = self.patch_size(tower)
        grid = token_grid([(num_tiles, height // patch_h, width // patch_w)], cls=True)
        return grid.view(num_tiles, -1, 3).roll(-1, dims=1).reshape(-1, 3)  # CLS first -> last

    def plan(
        self,
        x_before: torch.Tensor,
        x_after: torch.Tensor,
        cu_items: torch.Tensor,
        cu_seqlens: torch.Tensor,
        config: IPCVConfig,
        padding: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> IPCVPlan:
        # "authors" is "global" (the engine made the call one item): InternVL's per-tile plan does
        # not apply.
        return BatchedTowerAdapter.plan(self, x_before, x_after, cu_items, cu_seqlens, config, padding, scores)

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
        """The block's ``freqs_ci`` ``[N + 1, 1, Dh / 2]`` as packed ``(real, imag)`` rows
        ``[tiles * (N + 1), Dh / 2]``, memoised per forward."""
        kwargs = dict(kwargs)
        freqs = kwargs.pop("freqs_ci")
        memo = state.kept_rotary.get(("packed", id(freqs)))
        if memo is None or memo[0] is not freqs:
            tiles = state.segments.numel() - 1
            table = freqs.reshape(freqs.shape[0], -1).repeat(tiles, 1)
            # A table cast to a real dtype (``Module.to(dtype)`` drops the imaginary part) rotates
            # by its real part alone, as the model then does.
            imag = table.imag if table.is_complex() else torch.zeros_like(table)
            memo = (freqs, (table.real.float().contiguous(), imag.float().contiguous()))
            state.kept_rotary[("packed", id(freqs))] = memo
        return BatchedBlockCall(state.segments, memo[1], args, kwargs, state=state)

    def layer_parts(
        self, block: nn.Module, query_rotary: Rotary | None = None, key_rotary: Rotary | None = None
    ) -> PrenormLayer:
        """The parts of one layer, q rotated with ``query_rotary`` and k with ``key_rotary`` (the
        tables of the rows ``PrenormLayer.project`` gives them)."""
        if query_rotary is None or key_rotary is None:
            raise ValueError("Llama 4 layers need the rotary tables of their query and key rows")
        attention = block.self_attn
        heads, head_dim = attention.num_heads, attention.head_dim

        def q(x: torch.Tensor) -> torch.Tensor:
            return complex_rope(attention.q_proj(x).view(x.shape[0], heads, head_dim), *query_rotary).flatten(1)

        def k(x: torch.Tensor) -> torch.Tensor:
            return complex_rope(attention.k_proj(x).view(x.shape[0], heads, head_dim), *key_rotary).flatten(1)

        return PrenormLayer(
            norm1=block.input_layernorm,
            q=q,
            k=k,
            v=attention.v_proj,
            out=attention.o_proj,
            norm2=block.post_attention_layernorm,
            mlp=block.mlp,
            num_heads=heads,
            head_dim=head_dim,
            scale=head_dim**-0.5,  # the model's attention scales by head_dim ** -0.5
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
        parts = self.layer_parts(block, position_embeddings, position_embeddings)
        return prenorm_layer(parts, hidden, hidden, None, cu_seqlens, cu_seqlens, config.attention_backend)

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
        """Kept queries over every row of ``full``, each with its own rotary rows."""
        cos, sin = call.position_embeddings
        parts = self.layer_parts(block, (cos[plan.keep], sin[plan.keep]), (cos, sin))
        return prenorm_layer(
            parts, kept, full, plan.keep, kept_cu_seqlens, call.cu_seqlens.to(torch.int32), config.attention_backend
        )
