"""The IPCV engine: the state machine over a ViT's blocks, shared by every model family and framework.

``IPCVPatch`` wraps the tower's ``forward`` and each block's ``forward`` on the model *instance*
(never the class; see ``ipcv_kernels.engine.patching``). The tower's own forward still runs: it
keeps computing its patch embedding, rotary tables and segment offsets, and passes the hidden
states from block to block, unaware that from block ``P`` on they hold only the kept tokens. Per
forward (spec: ``docs/spec.md``):

- block ``P-1`` records its input (``x_before``);
- block ``P`` plans: scores (``IPCVConfig.selection``'s selector; ``||x_P - x_{P-1}||`` by
  default), per-item top-k, neighbours on ``base = x_P``;
- blocks ``P .. P+A-1`` (attention stabilisation) take the kept states ``h``, reconstruct the
  dropped ones, attend with kept queries over kept + reconstructed keys/values, and return ``h``;
- blocks ``P+A ..`` run the model's own block on the kept tokens with shrunk segments;
- the last block restores the full sequence, so the merger / head sees every token.

Everything one forward carries from block to block is a ``ForwardState`` bound to that forward's
context (``InstancePatch.bind``), so a patched tower is as re-entrant as the unpatched one.

The engine knows no framework. A ``FamilyAdapter`` (Hugging Face ones in ``ipcv_kernels.models``)
tells it where the blocks are (``blocks``), what the items and default segments of a tower call
are (``describe_call``), how a block call carries its segments and rotary tables
(``parse_block_call``), how to run the model's own block on other rows (``run_block``) and the
attention-stabilisation forward (``stabilised_block``). Optional hooks cover towers that differ
further: ``pack`` / ``unpack`` for towers whose blocks take a padded batch ``[B, L, D]`` instead of
packed rows (the engine works on packed rows from block ``P`` on), ``plan`` for tokens that must
never be dropped (a CLS token, padding; ``pinned_rows`` tells selectors which), ``token_grid``
for selectors that need each row's grid position, and ``install_hooks`` for modules that read intermediate block
outputs (they get full sequences through ``IPCVPatch.full_sequence``) or calls around the tower
that know how its inputs group into items (``IPCVPatch.hinted``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import IPCVConfig
from ..ops import ngr_restore, plan_ipcv, shrink_cu_seqlens
from ..reference import IPCVPlan
from ..selectors import DEFAULT_SELECTION, SelectionInputs, compute_scores, get_selector, plan_from_scores
from .patching import InstancePatch

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


@dataclass(frozen=True)
class TowerCall:
    """What a family adapter reads from one tower call before any block runs.

    item_lengths: token count of every item (image / video) of the call, in packing order.
    segments: int32 ``[S + 1]`` attention segments of the call's packed rows, for towers whose
        blocks take no segment argument (InternViT: one segment per tile); ``None`` otherwise.
    read_blocks: the blocks whose outputs the caller reads (a model reading
        ``hidden_states[-2]``, or several layers), ``None``: only the last block's. Each returns
        the restored full sequence (spec step 7 at that block), and blocks past the last of them
        are skipped (they return their input: nothing reads what they would compute).
    padding: bool ``[n]`` over the call's packed rows, ``True`` for padding rows (patches that
        Idefics3's ``patch_attention_mask`` marks as padding), ``None``: no padding. Only adapters
        on ``engine.batched`` take it: padding rows are pinned (``FamilyAdapter.plan``) and never
        serve as keys in any block.
    """

    item_lengths: list[int]
    segments: torch.Tensor | None = None
    read_blocks: tuple[int, ...] | None = None
    padding: torch.Tensor | None = None


@dataclass
class ForwardState:
    """What one forward of the tower carries from block to block (bound to that forward only)."""

    cu_items: torch.Tensor
    read_blocks: frozenset[int]  # TowerCall.read_blocks, resolved (the last block by default)
    segments: torch.Tensor | None = None  # TowerCall.segments
    padding: torch.Tensor | None = None  # TowerCall.padding
    grid: torch.Tensor | None = None  # FamilyAdapter.token_grid, read only by selectors other than the default
    # The previous block returned the restored full sequence (a read block): take its kept rows.
    restored: bool = False
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
    # The same for the key rows that remain once padding rows are left out (engine.batched).
    key_rows: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class BlockCall:
    """The arguments a tower passed to one block, split into what IPCV reads and the rest."""

    cu_seqlens: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    args: tuple
    kwargs: dict[str, Any]


class FamilyAdapter:
    """What differs between model families (and frameworks); one subclass per family.

    An adapter instance belongs to one patch (``IPCVPatch`` creates it with the module that
    ``apply_ipcv`` was given) and holds settings only, never per-forward state: that is the
    ``ForwardState`` the engine passes in.
    """

    name = "base"
    # The model's blocks add into their input tensor in place (SGLang's Qwen3-VL block:
    # ``x += attn``): the engine then records a copy of block ``P-1``'s input for the scores.
    blocks_modify_input = False

    def __init__(self, model: nn.Module | None = None) -> None:
        # The module ``apply_ipcv`` was given: the tower itself or a model wrapping it.
        self.model = model

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        return tower.blocks

    def check_config(self, tower: nn.Module, config: IPCVConfig) -> None:
        """Refuse (``ValueError`` naming the field) a config this tower cannot take beyond
        ``IPCVConfig.check_depth``, when the patch is built; every config by default (MiniCPM-V:
        prune layers at or before its in-tower merge)."""

    @classmethod
    def check_model_config(cls, model_config: Any, config: IPCVConfig) -> None:
        """``check_config`` from the model's configuration alone (``config.json``'s, before any
        model is built: a serving engine's settings check); every config by default."""

    def describe_call(self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]) -> TowerCall:
        """Items (and segments, where blocks take none) of one ``tower(*args, **kwargs)`` call.

        ``hints``: what calls around the tower told it about this call (``IPCVPatch.hinted``).
        """
        raise NotImplementedError

    def token_grid(
        self, tower: nn.Module, args: tuple, kwargs: dict[str, Any], hints: dict[str, Any]
    ) -> torch.Tensor | None:
        """int64 ``[n, 3]`` ``(part, row, col)`` of every packed row of this call
        (``SelectionInputs.grid``), ``None`` where unknown (the default). Called only when a
        selector other than the default one is configured."""
        return None

    def pinned_rows(self, cu_seqlens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        """int64 ascending rows that ``plan`` never drops (``None``: none); this base pins none."""
        if padding is not None:
            raise ValueError(f"the {self.name} adapter has no padding rows to pin")
        return None

    def install_hooks(self, patch: IPCVPatch) -> None:
        """Extra wrappers / hooks of this family, through ``patch.wrap`` / ``patch.add_hook`` (so
        that they are removed with the patch); none by default."""

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
        padding: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> IPCVPlan:
        """Spec steps 2-3 on packed rows; override to pin tokens that must never be dropped.

        ``padding``: ``TowerCall.padding`` (bool ``[n]``), rows to pin; this base takes none.
        ``scores``: float ``[n]`` of the configured selector, ``None``: the default score, which
        the fused ``plan_ipcv`` computes itself.
        """
        if padding is not None:
            raise ValueError(f"the {self.name} adapter has no padding rows to pin")
        if scores is not None:
            return plan_from_scores(
                scores, x_after, cu_items, cu_seqlens, config.ratio, config.num_neighbors, backend=config.ops_backend
            )
        return plan_ipcv(
            x_before,
            x_after,
            cu_items,
            cu_seqlens,
            config.ratio,
            config.num_neighbors,
            backend=config.ops_backend,
            skip_check=True,
        )

    def reference_plan(self, plan: IPCVPlan, padding: torch.Tensor | None) -> IPCVPlan:
        """``plan`` (made by ``plan`` with ``padding``) over the rows the family's transformers
        adapter plans for the same input, for comparisons across frameworks: the same rows by
        default (vLLM's MiniCPM-V leaves out the padding it adds, ``engine.batched.without_padding``)."""
        return plan

    def parse_block_call(self, args: tuple, kwargs: dict[str, Any], state: ForwardState) -> BlockCall:
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
        config: IPCVConfig,
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


def read_blocks(layers: int | list[int] | tuple[int, ...], depth: int) -> tuple[int, ...]:
    """The blocks whose outputs ``hidden_states[layer]`` are, for each of ``layers``.

    ``hidden_states`` holds the embeddings then every block's output (``depth + 1`` entries), so
    entry ``i`` (negative ones counted from the end) is block ``i - 1``'s output; entry 0 reads no
    block (``-1`` here: every block may be skipped).
    """
    chosen = [layers] if isinstance(layers, int) else list(layers)
    for layer in chosen:
        if not -(depth + 1) <= layer <= depth:
            raise ValueError(f"vision_feature_layer {layer} is outside the tower's {depth + 1} hidden states")
    return tuple(layer % (depth + 1) - 1 for layer in chosen)


def gather_rotary(
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if position_embeddings is None:
        return None
    cos, sin = position_embeddings
    return cos[rows], sin[rows]


class IPCVPatch(InstancePatch):
    """The installed IPCV patch of one tower: its config, adapter and wrapped forwards.

    ``last_tokens_per_block``: the rows each block computed outputs for in the most recent
    forward to finish (in any thread); ``last_keep``: int64 ``[Nk]`` the kept rows of that
    forward's packed sequence (block ``P``'s input rows; ``None`` if it did not reach block
    ``P``). Diagnostics, not per-call state.
    """

    attribute = PATCH_ATTRIBUTE

    def __init__(self, tower: nn.Module, adapter: FamilyAdapter, config: IPCVConfig) -> None:
        super().__init__(tower)
        self.tower = tower
        self.adapter = adapter
        self.config = config
        self.blocks = adapter.blocks(tower)
        self.depth = len(self.blocks)
        config.check_depth(self.depth)
        adapter.check_config(tower, config)
        self.selector = get_selector(config.selection)
        self.stabilisation_end = config.stabilisation_end(self.depth)
        self.last_tokens_per_block: list[int] = []
        self.last_keep: torch.Tensor | None = None
        self._hints: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(f"ipcv_hints@{id(self):x}")

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        self.wrap(self.tower, "forward", self._make_tower_forward)
        for index, block in enumerate(self.blocks):
            self.wrap(block, "forward", functools.partial(self._make_block_forward, index, block))
        self.adapter.install_hooks(self)
        super().install()

    def _make_tower_forward(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = self.adapter.describe_call(self.tower, args, kwargs, self._hints.get({}))
            # "global" and "authors": the whole call is one item (adapters refine "authors").
            lengths = call.item_lengths if self.config.scope == "image" else [sum(call.item_lengths)]
            offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
            read_blocks = frozenset(call.read_blocks if call.read_blocks is not None else (self.depth - 1,))
            state = ForwardState(offsets, read_blocks, call.segments, padding=call.padding)
            if self.config.selection != DEFAULT_SELECTION:
                state.grid = self.adapter.token_grid(self.tower, args, kwargs, self._hints.get({}))
            with self.bind(state):
                output = inner(*args, **kwargs)
            self.last_tokens_per_block = state.tokens_per_block
            self.last_keep = None if state.plan is None else state.plan.keep
            return output

        return forward

    def _make_block_forward(self, index: int, block: nn.Module, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self._block_forward(index, block, inner, hidden_states, args, kwargs)

        return forward

    def wrap_tower_call(self, module: nn.Module, name: str) -> None:
        """Make ``module.<name>`` a tower call (items described, the forward's state bound), as
        the tower's own ``forward`` is: for models that run the tower's blocks themselves, between
        modules of their own, without calling the tower (vLLM's MiniCPM-V). Removed with the patch."""
        self.wrap(module, name, self._make_tower_forward)

    @contextlib.contextmanager
    def hinted(self, **hints: Any) -> Iterator[None]:
        """Within the block, tower calls of this context see ``hints`` in ``describe_call``
        (e.g. InternVL's tiles per image, read by a wrapper of the model around the tower)."""
        token = self._hints.set({**self._hints.get({}), **hints})
        try:
            yield
        finally:
            self._hints.reset(token)

    # -- the per-block logic --------------------------------------------------------------------
    def _block_forward(
        self, index: int, block: nn.Module, original, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        state, cfg = self.state, self.config
        if state is None:  # block called outside a tower forward: behave as unpatched
            return original(hidden, *args, **kwargs)
        if index > max(state.read_blocks):
            return hidden  # nothing reads this block's output
        if index < cfg.prune_layer:
            state.tokens_per_block.append(self.adapter.pack(hidden).shape[0])
            if index == cfg.prune_layer - 1:
                state.x_before = hidden.clone() if self.adapter.blocks_modify_input else hidden
            return original(hidden, *args, **kwargs)

        call = self.adapter.parse_block_call(args, kwargs, state)
        if index == cfg.prune_layer:
            hidden = self._plan(state, hidden, call)
        elif state.restored:
            hidden, state.restored = self.adapter.pack(hidden)[state.plan.keep], False
        plan = state.plan
        state.tokens_per_block.append(hidden.shape[0])
        if index < self.stabilisation_end:
            full = self._restore(state, hidden)
            if cfg.as_queries == "all":
                out_full = self.adapter.run_block(
                    block, original, full, call.cu_seqlens, call.position_embeddings, call, cfg
                )
                hidden = out_full[plan.keep]
            else:
                hidden = self.adapter.stabilised_block(
                    block, hidden, full, plan, call, cfg, self._kept_segments(state, call.cu_seqlens).cu_seqlens
                )
        else:
            segments = self._kept_segments(state, call.cu_seqlens)
            hidden = self.adapter.run_block(
                block,
                original,
                hidden,
                segments.nonempty,
                self._kept_rotary(state, call.position_embeddings),
                call,
                cfg,
                segments.max_seqlen,
            )
        if index in state.read_blocks:
            state.restored = True
            return self.adapter.unpack(self._restore(state, hidden), state.block_layout)
        return hidden

    def _plan(self, state: ForwardState, x_after: torch.Tensor, call: BlockCall) -> torch.Tensor:
        layout = x_after.shape
        x_before, x_after = self.adapter.pack(state.x_before), self.adapter.pack(x_after)
        # The item offsets are built on the host: checked there, before the copy, so no device read.
        described = int(state.cu_items[-1])
        if described != x_after.shape[0]:
            raise ValueError(f"the tower's input holds {x_after.shape[0]} tokens but its grid describes {described}")
        cu_items = state.cu_items.to(x_after.device)
        cu_seqlens = call.cu_seqlens.to(torch.int32)
        scores = None
        if self.config.selection != DEFAULT_SELECTION:
            scores = self._scores(state, x_before, x_after, cu_items, cu_seqlens)
        plan = self.adapter.plan(x_before, x_after, cu_items, cu_seqlens, self.config, state.padding, scores)
        if not self.config.reconstruct:  # the naive baseline: NGR without neighbours keeps the base state
            plan = plan._replace(neighbors=torch.full_like(plan.neighbors, -1))
        state.plan, state.base, state.x_before, state.block_layout = plan, x_after, None, layout
        state.planned_cu_seqlens = call.cu_seqlens
        state.base_kept, state.base_drop = x_after[plan.keep], x_after[plan.drop]
        return state.base_kept

    def _scores(
        self,
        state: ForwardState,
        x_before: torch.Tensor,
        x_after: torch.Tensor,
        cu_items: torch.Tensor,
        cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """The configured selector's checked scores ``[n]`` of the packed rows."""
        pinned = self.adapter.pinned_rows(cu_seqlens, state.padding)
        if pinned is None:
            pinned = torch.empty(0, dtype=torch.int64, device=x_after.device)
        grid = None if state.grid is None else state.grid.to(x_after.device)
        if grid is not None and grid.shape != (x_after.shape[0], 3):
            raise ValueError(f"the adapter's token grid {tuple(grid.shape)} does not match {x_after.shape[0]} rows")
        inputs = SelectionInputs(x_before, x_after, cu_items, pinned, grid, self.config.selection_seed)
        return compute_scores(self.config.selection, self.selector, inputs)

    def _kept_segments(self, state: ForwardState, cu_seqlens: torch.Tensor) -> KeptSegments:
        """This block call's segments shrunk to the kept tokens (memoised per forward).

        Towers may pass different segments to different blocks (Qwen2.5-VL's windows); the plan
        already holds the shrink of block ``P``'s segments.
        """
        memo = state.kept_segments.get(id(cu_seqlens))
        if memo is not None and memo[0] is cu_seqlens:
            return memo[1]
        if cu_seqlens is state.planned_cu_seqlens:
            shrunk = state.plan.cu_seqlens_kept
        else:
            shrunk = shrink_cu_seqlens(cu_seqlens.to(torch.int32), state.plan.keep)
        nonempty = torch.unique_consecutive(shrunk)
        longest = int((nonempty[1:] - nonempty[:-1]).max()) if nonempty.numel() > 1 else 0
        segments = KeptSegments(shrunk, nonempty, longest)
        state.kept_segments[id(cu_seqlens)] = (cu_seqlens, segments)
        return segments

    def _kept_rotary(
        self, state: ForwardState, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables' kept rows (memoised per forward)."""
        if position_embeddings is None:
            return None
        cos = position_embeddings[0]
        memo = state.kept_rotary.get(id(cos))
        if memo is None or memo[0] is not cos:
            memo = (cos, gather_rotary(position_embeddings, state.plan.keep))
            state.kept_rotary[id(cos)] = memo
        return memo[1]

    def full_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """A block output as the full sequence: restored (spec step 7) where it holds kept rows.

        For modules that tap intermediate block outputs during a patched forward; anything else
        (a full-length input, or a call outside a pruned stretch) is returned unchanged.
        """
        state = self.state
        plan = state.plan if state is not None else None
        if plan is None or hidden.dim() != 2 or hidden.shape[0] != plan.keep.shape[0]:
            return hidden
        return self._restore(state, hidden)

    def restore_inputs(self, modules: Iterable[nn.Module]) -> None:
        """Give each of ``modules`` its first input (positional, else the first keyword) as
        ``full_sequence``: forward pre-hooks, removed with the patch, for modules that tap
        intermediate block outputs (Qwen3-VL's DeepStack mergers), so that every tap sees the full
        token count in the usual order."""

        def restore_first_input(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (self.full_sequence(args[0]), *args[1:]), kwargs
            name = next(iter(kwargs))
            return args, {**kwargs, name: self.full_sequence(kwargs[name])}

        for module in modules:
            self.add_hook(module.register_forward_pre_hook(restore_first_input, with_kwargs=True))

    def _restore(self, state: ForwardState, kept: torch.Tensor) -> torch.Tensor:
        """``full[keep] = kept``, ``full[drop] = NGR reconstruction`` (spec steps 4 and 7).

        ``skip_check``: the inputs come from the plan, so the public op's checks (host reads of the
        row and neighbour ranges) would only add a synchronisation per block on CUDA. On the
        Triton backend one fused kernel writes both row sets straight into ``full``.
        """
        plan = state.plan
        full = torch.empty_like(state.base)
        ngr_restore(
            full,
            kept,
            state.base_drop,
            state.base_kept,
            plan.keep,
            plan.drop,
            plan.neighbors,
            backend=self.config.ops_backend,
            skip_check=True,
        )
        return full
