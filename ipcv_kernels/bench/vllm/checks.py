"""The checks before timing: IPCV at ratio 0 equals the unpatched encoder, and vLLM's IPCV embeddings equal transformers' ``apply_ipcv`` on the same saved weights and plan."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ...reference import IPCVPlan
from ..calls import Case
from ..towers import load_vision_tower, tower_output
from ..vit import agreement_bound, relative_error
from .engine import Engine, recording_plans


def transformers_reference(
    engine: Engine, case: Case, dtype: torch.dtype, normalised: torch.Tensor, plan: IPCVPlan
) -> tuple[torch.Tensor, IPCVPlan, torch.Tensor]:
    """Transformers' Qwen2-VL tower on the same saved weights (``load_vision_tower``, on the
    engine's device) with ``apply_ipcv`` on ``normalised``: ``(its embeddings, its own plan, its embeddings on
    ``plan`` instead of its own)``, the plan swapped through its patch's adapter."""
    from ...api import apply_ipcv, get_ipcv_patch

    device = engine.device()
    tower = load_vision_tower(engine.checkpoint, dtype=dtype, device=device)
    adapter = get_ipcv_patch(apply_ipcv(tower, engine.configs["ipcv"])).adapter
    grid = torch.tensor(case.grid_thw, dtype=torch.int64, device=device)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return tower_output(tower(normalised.to(device, dtype), grid_thw=grid)).float().cpu()

    plans: list[IPCVPlan] = []
    adapter.plan = recording_plans(adapter, plans)
    own = forward()
    adapter.plan = lambda *args, **kwargs: plan
    on_plan = forward()
    del adapter.plan
    return own, plans[0], on_plan


def plan_agreement(theirs: IPCVPlan, ours: IPCVPlan) -> dict[str, float]:
    """How much two plans of one input share: the fraction of ``theirs``' kept tokens that
    ``ours`` keeps too, and, among the tokens both drop, the fraction with the same set of
    neighbours (NGR's reconstruction does not depend on their order)."""
    kept = torch.isin(theirs.keep, ours.keep)
    # Neighbours are rows of ``keep``: compared as token positions (``-1``, none, as row 0).
    mine = theirs.keep[theirs.neighbors[torch.isin(theirs.drop, ours.drop)].clamp_min(0)]
    other = ours.keep[ours.neighbors[torch.isin(ours.drop, theirs.drop)].clamp_min(0)]
    same = (mine.sort(-1).values == other.sort(-1).values).all(-1)
    return {
        "plans_kept_in_common": float(kept.float().mean()),
        "plans_same_neighbour_sets": float(same.float().mean()) if same.numel() else 1.0,
    }


def check_case(engine: Engine, case: Case, dtype: torch.dtype) -> dict[str, Any]:
    """IPCV at ratio 0 vs unpatched, and vLLM's IPCV vs transformers' on the same weights.

    The two plan from hidden states that differ by round-off (vLLM's CPU GEMMs are not
    transformers'), which may break near-ties of scores at the keep / drop cut or of neighbour
    distances differently: the spec allows either, and a tower of random weights has many. So,
    as the vision-tower benchmark does, transformers also runs on vLLM's plan, which vLLM must
    match (``ipcv_vs_transformers_same_plan``); the comparison of each on its own plan must pass
    too unless the plans differ (then it is kept as information only,
    ``ipcv_vs_transformers_informative``, beside how much of the plans agrees).
    """
    ipcv = engine.configs["ipcv"]
    checks: dict[str, Any] = {"bound": agreement_bound(dtype, engine.vision_config.depth)}
    pixels = engine.patches(case)
    engine.set_config(None)
    unpatched, _, _ = engine.encode(pixels, case)
    engine.set_config(replace(ipcv, ratio=0.0))
    ratio0, _, _ = engine.encode(pixels, case)
    checks["ratio0_vs_unpatched"] = relative_error(ratio0, unpatched)
    engine.set_config(ipcv)
    got, normalised, plan = engine.encode(pixels, case)
    own, own_plan, on_plan = transformers_reference(engine, case, dtype, normalised, plan)
    checks.update(plan_agreement(plan, own_plan))
    same_plans = checks["plans_kept_in_common"] == 1.0 and checks["plans_same_neighbour_sets"] == 1.0
    checks["ipcv_vs_transformers" if same_plans else "ipcv_vs_transformers_informative"] = relative_error(got, own)
    checks["ipcv_vs_transformers_same_plan"] = relative_error(got, on_plan)
    failed = {
        k: v
        for k, v in checks.items()
        if k.endswith(("_unpatched", "_transformers", "_same_plan")) and not v <= checks["bound"]
    }
    checks["passed"] = not failed
    checks["failed"] = failed
    return checks
