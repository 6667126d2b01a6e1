"""IPCV hyper-parameters: ``IPCVConfig``, a validated value object (it knows no model; the
settings recommended per family are in the family table, ``ipcv_kernels.families``)."""

from __future__ import annotations

from dataclasses import dataclass

from ._validation import check_choice, check_int, check_ratio

SCOPES = ("image", "global", "authors")
AS_QUERIES = ("kept", "all")


@dataclass(frozen=True)
class IPCVConfig:
    """Settings of one IPCV patch (see ``docs/spec.md``; ``recommended_config(model)`` gives a
    family's recommended ones).

    Attributes:
        prune_layer: ``P``, the block before which tokens are dropped; ``1 <= P < depth``
            (checked against the model in ``apply_ipcv``).
        ratio: ``r``, the fraction of tokens dropped per item, in ``[0, 1)``. ``0`` reproduces
            the unpatched model.
        as_layers: ``A >= 0``, attention-stabilisation blocks ``P .. P+A-1`` in which the dropped
            tokens are reconstructed and serve as keys/values. Values past the last block are
            clamped to "until the end".
        num_neighbors: ``k >= 1`` kept neighbours per dropped token for reconstruction.
        scope: ``"image"`` (each image / video competes and finds neighbours alone: a batch equals
            its items run one by one), ``"global"`` (the whole packed input is one item, as in
            the paper's code) or ``"authors"`` (each family as the paper authors' code ran it,
            for reproducing its numbers: ``"global"``, except that InternVL selects per tile,
            each tile's CLS kept and not counted, and its neighbours are any kept row of the
            call, CLS tokens included; see ``docs/spec.md`` §4).
        ops_backend: backend of every op IPCV runs except ``ngr_attention``: the planning step
            (``plan_ipcv`` / ``select_tokens``, ``knn``) and the restoration of the dropped tokens
            by NGR (``ngr_restore``); a name all of them have (``"auto"``, ``"torch"``, ``"cpp"``;
            the Triton kernels and the device-side planning come with ``"auto"`` on CUDA).
        attention_backend: backend of ``ngr_attention``, the kept-query attention of the
            stabilisation blocks (and of InternVL's pruned blocks).
        as_queries: ``"kept"`` computes queries for kept tokens only (``ngr_attention``, the fast
            path); ``"all"`` runs the model's own block on the full reconstructed sequence and
            discards the dropped rows (the paper code's formulation, for parity and benchmarks).
        reconstruct: ``True`` (IPCV) restores dropped tokens by NGR. ``False`` is the naive
            baseline for comparisons (``python -m ipcv_kernels fidelity``): every dropped token
            keeps its block-``P`` state wherever the full sequence is rebuilt (stabilisation blocks
            and the final restoration), as NGR with no valid neighbour gives.
        selection: the name of the selector that scores the tokens at block ``P`` (spec step 2):
            ``"diff"`` (the spec's ``||x_P - x_{P-1}||``), ``"norm"``, ``"random"``, ``"uniform"``
            or one registered with ``ipcv_kernels.register_selector`` / the entry-point group
            ``ipcv_kernels.selectors`` (resolved by ``apply_ipcv``).
        selection_seed: seed of selectors that draw random numbers (``"random"``), ``>= 0``.
    """

    prune_layer: int = 3
    ratio: float = 0.65
    as_layers: int = 7
    num_neighbors: int = 10
    scope: str = "image"
    ops_backend: str = "auto"
    attention_backend: str = "auto"
    as_queries: str = "kept"
    reconstruct: bool = True
    selection: str = "diff"
    selection_seed: int = 0

    def __post_init__(self) -> None:
        check_int("prune_layer", self.prune_layer, low=1)
        object.__setattr__(self, "ratio", check_ratio("ratio", self.ratio))
        check_int("as_layers", self.as_layers, low=0)
        check_int("num_neighbors", self.num_neighbors, low=1)
        check_choice("scope", self.scope, SCOPES)
        check_choice("as_queries", self.as_queries, AS_QUERIES)
        if not isinstance(self.reconstruct, bool):
            raise TypeError(f"reconstruct must be a bool, got {type(self.reconstruct).__name__}")
        check_int("selection_seed", self.selection_seed, low=0)
        if not isinstance(self.selection, str) or not self.selection:
            raise TypeError(f"selection must be a non-empty str (a selector name), got {self.selection!r}")
        for name in ("ops_backend", "attention_backend"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")

    def check_depth(self, depth: int) -> None:
        """Validate ``prune_layer`` against a tower of ``depth`` blocks."""
        check_int("prune_layer", self.prune_layer, low=1, high=depth)

    def stabilisation_end(self, depth: int) -> int:
        """First pruned block index ``min(P + A, depth)``."""
        return min(self.prune_layer + self.as_layers, depth)
