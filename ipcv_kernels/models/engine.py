"""The IPCV state machine over a ViT's blocks, shared by every model family.

``apply_ipcv`` wraps each block's ``forward`` on the model *instance* (never the class) and adds a
forward pre-hook / hook on the tower. The tower's own forward is untouched: it keeps computing its
patch embedding, rotary tables and segment offsets, and passes the hidden states from block to
block, unaware that from block ``P`` on they hold only the kept tokens. Per forward:

- block ``P-1`` records its input (``x_before``);
- block ``P`` plans: scores ``||x_P - x_{P-1}||``, per-item top-k, neighbours on ``base = x_P``;
- blocks ``P .. P+A-1`` (attention stabilisation) take the kept states ``h``, reconstruct the
  dropped ones, attend with kept queries over kept + reconstructed keys/values, and return ``h``;
- blocks ``P+A ..`` run the model's own block on the kept tokens with shrunk segments;
- the last block restores the full sequence, so the merger / head sees every token.

A family adapter (one module per model family) supplies what differs: how items are read from
the tower's call, and the block's attention-stabilisation forward. Optional adapter hooks cover
towers that differ further: ``pack`` / ``unpack`` for towers whose blocks take a padded batch
``[B, L, D]`` instead of packed rows (the engine works on packed rows from block ``P`` on),
``plan`` for tokens that must never be dropped (a CLS token), and ``install_hooks`` for modules
that read intermediate block outputs (they get full sequences through ``IPCVPatch.full_sequence``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import IPCVConfig
from ..ops import ngr_restore, plan_ipcv, shrink_cu_seqlens
from ..reference import IPCVPlan

PATCH_ATTRIBUTE = "_ipcv_patch"


@dataclass(frozen=True)
class KeptSegments:
    """One block call's attention segments restricted to the kept tokens.

    cu_seqlens: int32 ``[S + 1]``, every original segment (possibly empty): ``ngr_attention``'s
        query offsets, aligned with the original key offsets.
    nonempty: int32, the same offsets without empty segments, for the model's own per-segment
        attention loops (which fail on zero-length splits; empty segments contribute nothing).
    max_seqlen: the longest kept segment.
    """

    cu_seqlens: torch.Tensor
    nonempty: torch.Tensor
    max_seqlen: int


@dataclass
class ForwardState:
    """What one forward of the tower carries from block to block."""

    cu_items: torch.Tensor | None = None
    x_before: torch.Tensor | None = None
    plan: IPCVPlan | None = None
    base: torch.Tensor | None = None
    base_kept: torch.Tensor | None = None
    base_drop: torch.Tensor | None = None
    planned_cu_seqlens: torch.Tensor | None = None
    block_layout: torch.Size | None = None  # shape of block P's input, for ``FamilyAdapter.unpack``
    # Rows each block computes outputs for (its queries): all tokens before P, kept tokens after.
    tokens_per_block: list[int] = field(default_factory=list)
    # Per-forward memos keyed by the id of the tower's tensor (kept alive in the value, and
    # compared by identity): blocks receive the same segment and rotary tensors, so the shrink,
    # its host read and the rotary gather run once per distinct tensor, not once per block.
    kept_segments: dict[int, tuple[torch.Tensor, KeptSegments]] = field(default_factory=dict)
    kept_rotary: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class BlockCall:
    """The arguments a tower passed to one block, split into what IPCV reads and the rest."""

    cu_seqlens: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    args: tuple
    kwargs: dict[str, Any]


class FamilyAdapter:
    """What differs between model families. Subclasses live in ``ipcv_kernels.models.<family>``."""

    name = "base"
    # This family's recommended ``IPCVConfig`` fields (``IPCVConfig.for_model``); others default.
    default_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module | None = None) -> None:
        # The module ``apply_ipcv`` was given: the tower itself or a model wrapping it.
        self.model = model

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        return tower.blocks

    def item_lengths(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[int]:
        """Token count of every item (image / video) of one tower call, in packing order."""
        raise NotImplementedError

    def install_hooks(self, patch: IPCVPatch) -> list[torch.utils.hooks.RemovableHandle]:
        """Extra hooks of this family (removed with the patch); none by default."""
        return []

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        """A block's input as packed rows ``[n, D]``: identity for packed (varlen) towers.

        Towers whose blocks take a batch ``[B, L, D]`` return ``hidden.reshape(-1, D)``; their
        blocks from ``P`` on then receive and return packed kept rows.
        """
        return hidden

    def unpack(self, packed: torch.Tensor, layout: torch.Size) -> torch.Tensor:
        """Inverse of ``pack``: the restored ``[n, D]`` rows in block ``P``'s input ``layout``."""
        return packed

    def plan(
        self,
        x_before: torch.Tensor,
        x_after: torch.Tensor,
        cu_items: torch.Tensor,
        cu_seqlens: torch.Tensor,
        config: IPCVConfig,
    ) -> IPCVPlan:
        """Spec steps 2-3 on packed rows; override to pin tokens that must never be dropped."""
        return plan_ipcv(
            x_before,
            x_after,
            cu_items,
            cu_seqlens,
            config.ratio,
            config.num_neighbors,
            backend=config.backend,
            skip_check=True,
        )

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any]) -> BlockCall:
        kwargs = dict(kwargs)
        if "cu_seqlens" in kwargs:
            cu_seqlens = kwargs.pop("cu_seqlens")
        else:
            cu_seqlens, args = args[0], args[1:]
        position_embeddings = kwargs.pop("position_embeddings", None)
        return BlockCall(cu_seqlens, position_embeddings, args, kwargs)

    def run_block(
        self,
        block: nn.Module,
        forward: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        call: BlockCall,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """The model's own block forward with the given segments (none empty) and rotary tables.

        ``max_seqlen`` replaces the tower's value where the block takes one (``None`` keeps it).
        """
        kwargs = dict(call.kwargs)
        if max_seqlen is not None and "max_seqlen" in kwargs:
            kwargs["max_seqlen"] = max_seqlen
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        return forward(hidden, *call.args, cu_seqlens=cu_seqlens, **kwargs)

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
        """One attention-stabilisation block with queries for kept rows only; returns kept rows.

        ``kept_cu_seqlens`` are this call's segments restricted to the kept (query) rows; the
        key/value segments are ``call.cu_seqlens`` over ``full``.
        """
        raise NotImplementedError


def gather_rotary(
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if position_embeddings is None:
        return None
    cos, sin = position_embeddings
    return cos[rows], sin[rows]


class IPCVPatch:
    """The installed patch of one tower: its config, hooks, wrapped blocks and per-call state."""

    def __init__(self, tower: nn.Module, adapter: FamilyAdapter, config: IPCVConfig) -> None:
        self.tower = tower
        self.adapter = adapter
        self.config = config
        self.blocks = adapter.blocks(tower)
        self.depth = len(self.blocks)
        config.check_depth(self.depth)
        self.stabilisation_end = config.stabilisation_end(self.depth)
        self.state = ForwardState()
        self.last_tokens_per_block: list[int] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        self._handles.append(self.tower.register_forward_pre_hook(self._start_forward, with_kwargs=True))
        self._handles.append(self.tower.register_forward_hook(self._end_forward))
        for index, block in enumerate(self.blocks):
            block.forward = self._make_block_forward(index, block, block.forward)
        self._handles.extend(self.adapter.install_hooks(self))
        setattr(self.tower, PATCH_ATTRIBUTE, self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.blocks:
            # The wrapper is an instance attribute shadowing the class's forward: deleting it
            # restores the original bound method exactly.
            del block.forward
        delattr(self.tower, PATCH_ATTRIBUTE)

    def _make_block_forward(self, index: int, block: nn.Module, original):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self._block_forward(index, block, original, hidden_states, args, kwargs)

        return forward

    # -- per-forward state ----------------------------------------------------------------------
    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        lengths = self.adapter.item_lengths(self.tower, args, kwargs)
        if self.config.scope == "global":
            lengths = [sum(lengths)]
        offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
        self.state = ForwardState(cu_items=offsets)

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.last_tokens_per_block = self.state.tokens_per_block
        self.state = ForwardState()

    # -- the per-block logic --------------------------------------------------------------------
    def _block_forward(
        self, index: int, block: nn.Module, original, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        state, cfg = self.state, self.config
        if state.cu_items is None:  # block called outside a tower forward: behave as unpatched
            return original(hidden, *args, **kwargs)
        if index < cfg.prune_layer:
            state.tokens_per_block.append(self.adapter.pack(hidden).shape[0])
            if index == cfg.prune_layer - 1:
                state.x_before = hidden
            return original(hidden, *args, **kwargs)

        call = self.adapter.parse_block_call(args, kwargs)
        if index == cfg.prune_layer:
            hidden = self._plan(hidden, call)
        plan = state.plan
        state.tokens_per_block.append(hidden.shape[0])
        if index < self.stabilisation_end:
            full = self._restore(hidden)
            if cfg.as_queries == "all":
                out_full = self.adapter.run_block(
                    block, original, full, call.cu_seqlens, call.position_embeddings, call
                )
                hidden = out_full[plan.keep]
            else:
                hidden = self.adapter.stabilised_block(
                    block, hidden, full, plan, call, cfg, self._kept_segments(call.cu_seqlens).cu_seqlens
                )
        else:
            segments = self._kept_segments(call.cu_seqlens)
            hidden = self.adapter.run_block(
                block,
                original,
                hidden,
                segments.nonempty,
                self._kept_rotary(call.position_embeddings),
                call,
                segments.max_seqlen,
            )
        if index == self.depth - 1:
            return self.adapter.unpack(self._restore(hidden), state.block_layout)
        return hidden

    def _plan(self, x_after: torch.Tensor, call: BlockCall) -> torch.Tensor:
        state = self.state
        layout = x_after.shape
        x_before, x_after = self.adapter.pack(state.x_before), self.adapter.pack(x_after)
        # The item offsets are built on the host: checked there, before the copy, so no device read.
        described = int(state.cu_items[-1])
        if described != x_after.shape[0]:
            raise ValueError(f"the tower's input holds {x_after.shape[0]} tokens but its grid describes {described}")
        cu_items = state.cu_items.to(x_after.device)
        plan = self.adapter.plan(x_before, x_after, cu_items, call.cu_seqlens.to(torch.int32), self.config)
        state.plan, state.base, state.x_before, state.block_layout = plan, x_after, None, layout
        state.planned_cu_seqlens = call.cu_seqlens
        state.base_kept, state.base_drop = x_after[plan.keep], x_after[plan.drop]
        return state.base_kept

    def _kept_segments(self, cu_seqlens: torch.Tensor) -> KeptSegments:
        """This block call's segments shrunk to the kept tokens (memoised per forward).

        Towers may pass different segments to different blocks (Qwen2.5-VL's windows); the plan
        already holds the shrink of block ``P``'s segments.
        """
        memo = self.state.kept_segments.get(id(cu_seqlens))
        if memo is not None and memo[0] is cu_seqlens:
            return memo[1]
        if cu_seqlens is self.state.planned_cu_seqlens:
            shrunk = self.state.plan.cu_seqlens_kept
        else:
            shrunk = shrink_cu_seqlens(cu_seqlens.to(torch.int32), self.state.plan.keep)
        nonempty = torch.unique_consecutive(shrunk)
        longest = int((nonempty[1:] - nonempty[:-1]).max()) if nonempty.numel() > 1 else 0
        segments = KeptSegments(shrunk, nonempty, longest)
        self.state.kept_segments[id(cu_seqlens)] = (cu_seqlens, segments)
        return segments

    def _kept_rotary(
        self, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables' kept rows (memoised per forward)."""
        if position_embeddings is None:
            return None
        cos = position_embeddings[0]
        memo = self.state.kept_rotary.get(id(cos))
        if memo is None or memo[0] is not cos:
            memo = (cos, gather_rotary(position_embeddings, self.state.plan.keep))
            self.state.kept_rotary[id(cos)] = memo
        return memo[1]

    def full_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """A block output as the full sequence: restored (spec step 7) where it holds kept rows.

        For modules that tap intermediate block outputs during a patched forward; anything else
        (a full-length input, or a call outside a pruned stretch) is returned unchanged.
        """
        plan = self.state.plan
        if plan is None or hidden.dim() != 2 or hidden.shape[0] != plan.keep.shape[0]:
            return hidden
        return self._restore(hidden)

    def _restore(self, kept: torch.Tensor) -> torch.Tensor:
        """``full[keep] = kept``, ``full[drop] = NGR reconstruction`` (spec steps 4 and 7).

        ``skip_check``: the inputs come from the plan, so the public op's checks (host reads of the
        row and neighbour ranges) would only add a synchronisation per block on CUDA. On the
        Triton backend one fused kernel writes both row sets straight into ``full``.
        """
        state, plan = self.state, self.state.plan
        full = torch.empty_like(state.base)
        ngr_restore(
            full,
            kept,
            state.base_drop,
            state.base_kept,
            plan.keep,
            plan.drop,
            plan.neighbors,
            backend=self.config.backend,
            skip_check=True,
        )
        return full
