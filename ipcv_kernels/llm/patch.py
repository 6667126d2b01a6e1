"""LLM-side pruning on stock transformers: per-instance wrappers of the decoder layers.

The text model's own forward is untouched. It embeds the tokens, computes the rotary tables and
attention masks for the FULL sequence once, and passes them to every decoder layer. The wrappers
make layers ``K ..`` work on the kept tokens only:

- a wrapper of the multimodal model's forward reads which tokens are image / video tokens
  (``input_ids``) and which are padding (its 2-D ``attention_mask``: Gemma 3 and PaliGemma hand
  their text model prebuilt 4-D masks, or one per layer type); a wrapper of the text model's forward binds the per-forward state to that
  forward (``InstancePatch.bind``: concurrent forwards never share it);
- layer ``K - 1`` records its input (FastV scores it); layer ``K``, in a prefill that starts from
  an empty cache and holds image / video tokens, asks the pruner for the kept tokens;
- layers ``K ..`` get their hidden states, rotary ``(cos, sin)`` (one table per layer type where
  the model has several, as Gemma 3's local and global rotary), text position ids and attention
  mask (whatever the model built for that layer: causal, sliding-window, Gemma 3's bidirectional
  image blocks, PaliGemma's prefix-LM) restricted to the kept tokens: the KV cache of layers ``>= K`` then holds the kept tokens
  only, while layers ``< K`` hold all of them;
- Qwen3-VL's DeepStack step (vision features added to the visual tokens after its first
  decoder layers) adds, from layer ``K`` on, the kept visual tokens' own features;
- at the end of the text model's forward the kept rows are scattered back into a full-length
  ``last_hidden_state`` (dropped rows carry their layer-``K`` input through the final norm), so
  logits keep the unpatched shapes (the per-layer ``hidden_states`` / ``attentions`` that
  ``output_hidden_states`` / ``output_attentions`` report hold the kept tokens from layer ``K`` on).

Decoding stays exact: positions come from the full sequence (layer 0's cache length and
Qwen2-VL's ``rope_deltas``, both unpruned), so generated tokens get the positions they would have
had without pruning. In every later forward, layers ``>= K`` get masks built from the positions
their cache holds (tracked per cache object; a sliding-window cache layer holds the last
``window - 1`` of them): causal, within the layer's window, padding masked out. The model's own
masks for those forwards cannot be cut down, since transformers sizes a layer type's mask from the
cache of its FIRST layer, which may be a pruned one. Tokens of such a later forward attend
causally among themselves (a chunk with Gemma 3 image blocks after a pruned prefill is not
supported).

Supported: ``DynamicCache`` (generate's default, with its sliding-window layers) or no cache;
eager, sdpa and flash attention masks (4-D or 2-D tensors, or ``None``). Not supported: static
(compileable) caches, flex attention's block masks, packed sequences, flash attention on
sliding-window layers (its window counts cached entries, which pruning shifts).
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.patching import InstancePatch
from ..reference.llm_pruning import llm_keep_count
from .pruners import LLMPruner, PruningInputs

LLM_PATCH_ATTRIBUTE = "_ipcv_llm_patch"


@dataclass
class TextForwardState:
    """What one forward of the text model carries from layer to layer."""

    visual: torch.Tensor | None
    padding: torch.Tensor | None  # [B, L] this forward's padding tokens
    key_padding: torch.Tensor | None  # [B, past + L] padding over the whole sequence, if known
    length: int  # L, this forward's tokens
    past_length: int
    prunable: bool
    hidden_before: torch.Tensor | None = None
    hidden_full: torch.Tensor | None = None
    kept: torch.Tensor | None = None  # [B, L] positions in this forward's input, or None: all
    columns: torch.Tensor | None = None  # [B, C] full-mask columns held by the pruned layers' cache
    sliced: dict | None = None  # memo: the kwargs of layers >= K, per attention-mask object


class LLMPruningPatch(InstancePatch):
    """The installed LLM-side pruner of one multimodal model: wrapped forwards and layers.

    ``last_kept``: the kept positions of the most recent pruned prefill to finish (in any
    thread); a diagnostic, not per-call state.
    """

    attribute = LLM_PATCH_ATTRIBUTE

    def __init__(
        self,
        model: nn.Module,
        text_model: nn.Module,
        pruner: LLMPruner,
        visual_token_ids: tuple[int, ...],
    ) -> None:
        super().__init__(text_model)
        self.model = model
        self.text_model = text_model
        self.layers: nn.ModuleList = text_model.layers
        # Pruners read and slice standard attention layers (``self_attn``: q / k projections, a KV
        # cache). A hybrid decoder's linear-attention layers (Qwen3.5's Gated DeltaNet) carry a
        # recurrent state over every token instead, which dropping tokens would change for all
        # later positions: refused, not approximated.
        other = non_attention_layers(text_model)
        if other:
            raise TypeError(
                f"llm_pruner: not supported on {type(text_model).__name__}: LLM-side pruning (FastV, DART) "
                "needs a decoder of standard attention layers; "
                f"it has {len(other)} layers without self-attention (layers {other}: "
                "linear attention, e.g. Gated DeltaNet), which LLM-side pruning does not support"
            )
        pruner.check_depth(len(self.layers))
        sliding = [i for i, layer in enumerate(self.layers) if getattr(layer.self_attn, "sliding_window", None)]
        if sliding and sliding[0] >= pruner.layer:
            # transformers sizes the sliding-window mask of every later forward from the cache of the
            # first sliding layer, which would then hold the kept tokens only.
            raise NotImplementedError(
                f"LLM-side pruning needs the first sliding-window layer ({sliding[0]}) before the prune layer "
                f"(layer={pruner.layer})"
            )
        # FastV's and DART's scores (spec §8) read per-head query / key projections of layers K - 1
        # and K; a decoder whose attention has none (DeepSeek-V3's multi-head latent attention:
        # low-rank q_a / q_b and a joint kv_a projection, rotary on a separate slice) is not covered.
        for attention in (self.layers[pruner.layer - 1].self_attn, self.layers[pruner.layer].self_attn):
            if getattr(attention, "q_proj", None) is None or getattr(attention, "k_proj", None) is None:
                raise TypeError(
                    f"llm_pruner: FastV and DART need a decoder attention with q_proj and k_proj; "
                    f"{type(attention).__name__} has none (multi-head latent attention is not supported)"
                )
        self.pruner = pruner
        self.visual_token_ids = visual_token_ids
        self.last_kept: torch.Tensor | None = None
        # The visual-token and 2-D attention masks the multimodal model's forward read, for the
        # text-model forward it runs (a context variable: one per call in progress).
        self._pending: contextvars.ContextVar[tuple[torch.Tensor | None, torch.Tensor | None]] = contextvars.ContextVar(
            f"ipcv_llm_call@{id(self):x}", default=(None, None)
        )
        # The pruned layers' cache columns, per cache object (generation keeps one per call).
        self._cache_columns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        self.wrap(self.model, "forward", self._make_model_forward)
        self.wrap(self.text_model, "forward", self._make_text_forward)
        for index in range(self.pruner.layer - 1, len(self.layers)):
            self.wrap(self.layers[index], "forward", functools.partial(self._make_layer_forward, index))
        if hasattr(self.text_model, "_deepstack_process"):  # Qwen3-VL
            self.wrap(self.text_model, "_deepstack_process", self._make_deepstack)
        super().install()

    def _make_deepstack(self, original):
        """Qwen3-VL's DeepStack step on the kept tokens.

        After each of its first decoder layers the text model adds vision features to the visual
        tokens: ``hidden[visual_pos_masks] += visual_embeds``, one row per visual token of the full
        sequence in row-major order. From layer ``K`` on, ``hidden`` holds the kept tokens only:
        the kept visual tokens get their own rows (dropped ones take no further part).
        """

        def deepstack(hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
            state = self.state
            if state is None or state.kept is None or hidden.shape[1] == visual_pos_masks.shape[-1]:
                return original(hidden, visual_pos_masks, visual_embeds)
            mask = visual_pos_masks.to(hidden.device)
            embed_row = mask.flatten().cumsum(0).view_as(mask) - 1  # each visual token's row
            kept_visual = mask.gather(1, state.kept)
            rows = embed_row.gather(1, state.kept)[kept_visual]
            return original(hidden, kept_visual, visual_embeds[rows.to(visual_embeds.device)])

        return deepstack

    def _make_layer_forward(self, index: int, original):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            return self._layer_forward(index, original, hidden_states, args, kwargs)

        return forward

    def _make_model_forward(self, original):
        def forward(*args: Any, **kwargs: Any) -> Any:
            token = self._pending.set((self._read_tokens(args, kwargs), padding_mask_2d(kwargs)))
            try:
                return original(*args, **kwargs)
            finally:
                self._pending.reset(token)

        return forward

    def _make_text_forward(self, original):
        def forward(*args: Any, **kwargs: Any) -> Any:
            with self.bind(self._start_forward(args, kwargs)) as state:
                output = original(*args, **kwargs)
            return self._end_forward(state, output)

        return forward

    # -- per-forward state ----------------------------------------------------------------------
    def _visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.visual_token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)

    def _read_tokens(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The visual-token mask of a multimodal-model call (``None`` if it cannot be told)."""
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        if input_ids is not None:
            return self._visual_mask(input_ids)
        if kwargs.get("mm_token_type_ids") is not None:
            return kwargs["mm_token_type_ids"] != 0
        return None

    def _start_forward(self, args: tuple, kwargs: dict[str, Any]) -> TextForwardState:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, length = input_ids.shape if input_ids is not None else embeds.shape[:2]
        visual, attention_mask = self._pending.get()
        if input_ids is not None:  # the text model called on its own
            visual = self._visual_mask(input_ids)
        if padding_mask_2d(kwargs) is not None:
            attention_mask = padding_mask_2d(kwargs)
        if visual is not None and tuple(visual.shape) != (batch, length):
            visual = None
        cache = cache_argument(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise NotImplementedError(
                "LLM-side pruning needs a dynamic KV cache (its pruned layers hold fewer tokens); "
                f"got {type(cache).__name__}"
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        key_padding = padding = None
        if attention_mask is not None and attention_mask.shape == (batch, past_length + length):
            key_padding = attention_mask == 0
            padding = key_padding[:, past_length:]
        prunable = length > 1 and past_length == 0 and visual is not None and bool(visual.any())
        return TextForwardState(visual, padding, key_padding, length, past_length, prunable)

    def _end_forward(self, state: TextForwardState, output: Any) -> Any:
        if state.kept is None:
            return output
        self.last_kept = state.kept
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        full = self.text_model.norm(state.hidden_full).to(hidden.dtype)
        full.scatter_(1, state.kept[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.last_hidden_state = full
        return output

    # -- the per-layer logic --------------------------------------------------------------------
    def _layer_forward(self, index: int, original, hidden: torch.Tensor, args: tuple, kwargs: dict):
        state = self.state
        if state is None:  # layer called outside a text-model forward: behave as unpatched
            return original(hidden, *args, **kwargs)
        if index == self.pruner.layer - 1:
            state.hidden_before = hidden
            return original(hidden, *args, **kwargs)
        if index == self.pruner.layer:
            hidden = self._prune(hidden, kwargs)
        if state.columns is not None:
            kwargs = self._sliced_kwargs(index, kwargs)
        return original(hidden, *args, **kwargs)

    def _prune(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """At layer ``K``: choose the kept tokens and the pruned layers' cache columns."""
        state = self.state
        cache = cache_argument(kwargs)
        batch, length = hidden.shape[:2]
        if state.prunable:
            state.kept = self._select(hidden, kwargs["position_embeddings"])
            state.hidden_full = hidden
        state.hidden_before = None  # only the selection reads it
        known = self._cache_columns.get(cache) if cache is not None and state.past_length > 0 else None
        if state.kept is None and known is None:
            return hidden  # nothing pruned now nor earlier: layers >= K see what layer 0 sees
        new = state.kept if state.kept is not None else torch.arange(length, device=hidden.device).expand(batch, -1)
        new = new + state.past_length
        if state.past_length > 0:
            # A cache this patch has not seen holds every token in every layer.
            old = known if known is not None else torch.arange(state.past_length, device=hidden.device)
            new = torch.cat([old.expand(batch, -1), new], dim=1)
        state.columns = new
        state.sliced = {}
        if cache is not None:
            self._cache_columns[cache] = new
        if state.kept is None:
            return hidden
        return hidden.gather(1, state.kept[..., None].expand(-1, -1, hidden.shape[-1]))

    def _select(self, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """``[B, L]`` sorted positions of the tokens kept in every row (rows keep equal counts).

        Each row's candidates are its image / video tokens except the last token. Row ``b`` wants
        to drop ``d_b = n_b - max(1, int(n_b * (1 - R)))`` of its ``n_b`` candidates; the KV cache
        is one tensor, so every row must drop the same number ``D = min_b (d_b + pad_b)`` of
        tokens, where ``pad_b`` counts its padding tokens. A row drops ``min(d_b, D)`` candidates
        and, for the rest, its leftmost padding tokens (masked out of attention anyway); so a row
        keeps more than its share only when another row lacks tokens to drop (e.g. a text-only
        row in the batch without enough padding).
        """
        state = self.state
        batch, length = hidden.shape[:2]
        padding = state.padding if state.padding is not None else torch.zeros_like(state.visual)
        candidates = state.visual & ~padding
        candidates[:, -1] = False
        counts = candidates.sum(dim=1).tolist()
        pads = padding.sum(dim=1).tolist()
        wanted = [n - llm_keep_count(n, self.pruner.ratio) for n in counts]
        dropped = min(d + p for d, p in zip(wanted, pads, strict=True))
        num_keep = [n - min(d, dropped) for n, d in zip(counts, wanted, strict=True)]
        inputs = PruningInputs(
            layers=self.layers,
            hidden=hidden,
            hidden_before=state.hidden_before,
            position_embeddings=position_embeddings,
            candidates=candidates,
            text=~state.visual & ~padding,
            padding=padding,
        )
        chosen = self.pruner.select(inputs, num_keep)
        keep = ~candidates
        for row in range(batch):
            pad_drop = dropped - (counts[row] - num_keep[row])
            keep[row, padding[row].nonzero().flatten()[:pad_drop]] = False
            keep[row, chosen[row]] = True
        return keep.nonzero()[:, 1].view(batch, length - dropped)

    def _sliced_kwargs(self, index: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Layer ``index``'s kwargs restricted to the kept queries and the columns its cache holds."""
        state = self.state
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        attention = self.layers[index].self_attn
        mask_window = getattr(attention, "sliding_window", None)
        if mask_window is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            raise NotImplementedError(
                "LLM-side pruning does not support flash attention on sliding-window layers: its window "
                "counts cached entries, not positions"
            )
        cache_window = sliding_cache_window(cache_argument(kwargs), index)
        key = (id(mask), mask_window, cache_window)  # layers of one type share their mask
        if key not in state.sliced:
            if state.past_length == 0:
                state.sliced[key] = self._slice_mask(mask)
            else:
                state.sliced[key] = self._decoding_mask(mask, mask_window, cache_window)
        kwargs["attention_mask"] = state.sliced[key]
        if state.kept is not None:
            cos, sin = kwargs["position_embeddings"]
            rotary = ("rotary", id(cos))  # one table per layer type (Gemma 3: local and global)
            if rotary not in state.sliced:
                state.sliced[rotary] = (take_rows(cos, state.kept), take_rows(sin, state.kept))
            kwargs["position_embeddings"] = state.sliced[rotary]
            ids = kwargs.get("position_ids")
            if ids is not None:
                if "position_ids" not in state.sliced:
                    if ids.dim() == 3:  # multimodal rotary ids [sections, B or 1, S] (GLM-4.5V's layers)
                        kept = state.kept.expand(ids.shape[0], -1, -1)
                        sliced = ids.expand(-1, len(state.kept), -1).gather(2, kept)
                    else:
                        sliced = ids.expand(len(state.kept), -1).gather(1, state.kept)
                    state.sliced["position_ids"] = sliced
                kwargs["position_ids"] = state.sliced["position_ids"]
        return kwargs

    def _slice_mask(self, mask: Any) -> Any:
        """A prefill's mask (the model's own, any pattern) cut to the kept rows and columns."""
        state = self.state
        if mask is None:
            # sdpa's causal shortcut (no padding, window not binding): still causal over the kept
            # tokens in order.
            return None
        if not isinstance(mask, torch.Tensor):
            raise NotImplementedError(
                f"LLM-side pruning supports tensor attention masks (eager, sdpa, flash), got {type(mask).__name__}"
            )
        batch = state.columns.shape[0]
        if mask.dim() == 2:  # flash attention: [B, kv] padding mask
            return mask.expand(batch, -1).gather(1, state.columns)
        mask = mask.expand(batch, *mask.shape[1:])
        rows = state.kept[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1])
        mask = mask.gather(2, rows)
        columns = state.columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
        return mask.gather(3, columns)

    def _decoding_mask(self, mask: Any, mask_window: int | None, cache_window: int | None) -> Any:
        """The mask of a pruned layer in a forward after the pruned prefill, from positions.

        Args:
            mask: the model's mask for the layer (its format is kept: ``None``, a 2-D flash
                padding mask, a 4-D boolean or additive float mask).
            mask_window: the layer's attention window (a key ``j`` is seen from ``i`` when
                ``i - window < j <= i``), or ``None``.
            cache_window: the window of the layer's sliding cache (it holds the last
                ``window - 1`` earlier entries), or ``None``.

        Returns:
            ``None``, ``[B, C]`` or ``[B, 1, L, C]`` for the ``C`` columns the layer's cache holds.
        """
        state = self.state
        if mask is None:
            # sdpa's shortcut: no padding, and every cached key lies within any window.
            return None
        if not isinstance(mask, torch.Tensor):
            raise NotImplementedError(
                f"LLM-side pruning supports tensor attention masks (eager, sdpa, flash), got {type(mask).__name__}"
            )
        columns = state.columns
        if cache_window is not None:
            held = columns.shape[1] - state.length  # what the layer cached before this forward
            columns = columns[:, max(held - (cache_window - 1), 0) :]
        queries = torch.arange(state.past_length, state.past_length + state.length, device=columns.device)
        keys = columns[:, None, :]
        allowed = keys <= queries[None, :, None]
        if mask_window is not None:
            allowed &= keys > queries[None, :, None] - mask_window
        if state.key_padding is not None:
            allowed &= ~state.key_padding.gather(1, columns)[:, None, :]
        if mask.dim() == 2:  # flash attention: causal by itself, a padding mask over the columns
            return allowed[:, -1].to(mask.dtype)
        allowed = allowed[:, None]
        if mask.dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~allowed, torch.finfo(mask.dtype).min
        )


def non_attention_layers(text_model: nn.Module) -> list[int]:
    """Indices of ``text_model``'s decoder layers without standard self-attention (``self_attn``):
    a hybrid decoder's linear-attention layers, which LLM-side pruning refuses."""
    return [i for i, layer in enumerate(text_model.layers) if not hasattr(layer, "self_attn")]


def padding_mask_2d(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The 2-D ``[B, past + L]`` attention (padding) mask of a model call, or ``None``."""
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def sliding_cache_window(cache: Any, index: int) -> int | None:
    """The window of cache layer ``index`` if it is a sliding-window layer (which keeps only the
    last ``window - 1`` entries between forwards), else ``None``."""
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers) or not getattr(layers[index], "is_sliding", False):
        return None
    return getattr(layers[index], "sliding_window", None)


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to the text model or a decoder layer, under either name.

    transformers 5.24 renamed the ``past_key_values`` argument to ``cache``; both are read so that
    one patch holds across 5.x.
    """
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def take_rows(table: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``table[b, kept[b]]`` for a ``[B or 1, S, d]`` rotary table and ``[B, L]`` positions."""
    table = table.expand(kept.shape[0], *table.shape[1:])
    return table.gather(1, kept[..., None].expand(-1, -1, table.shape[-1]))
