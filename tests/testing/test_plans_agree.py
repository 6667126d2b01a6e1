"""``ipcv_kernels.testing.assert_plans_agree``: plans equal up to near-ties, and nothing more.

Four rows in fp64: kept ``a = (1, 0, 0, 0)``, ``b = (-1 - delta, 0, 0, 0)``, ``c = (0, 3, 0, 0)``
and dropped ``d = 0`` (one neighbour each), with scores that keep ``a``, ``b``, ``c``. At
``delta = 0`` the dropped row's nearest neighbour ties between ``a`` and ``b``; the other choice
passes while ``delta`` stays below the fp32 resolution and fails beyond it."""

from __future__ import annotations

import pytest
import torch

from ipcv_kernels.reference import plan_reference
from ipcv_kernels.testing import assert_plans_agree, plan_resolution

SCORES = torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)  # a, b, c kept; d dropped


def rows(delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    x_after = torch.zeros(4, 4, dtype=torch.float64)
    x_after[0, 0], x_after[1, 0], x_after[2, 1] = 1.0, -1.0 - delta, 3.0
    x_before = x_after.clone()
    x_before[:, 3] -= SCORES  # score_j = |x_after[j] - x_before[j]|
    return x_before, x_after


def plan_of(x_before: torch.Tensor, x_after: torch.Tensor):
    cu = torch.tensor([0, 4], dtype=torch.int32)
    return plan_reference(x_before, x_after, cu, cu, 0.25, 1)


def the_other_neighbour(plan):
    """The plan choosing ``b`` for ``d`` where it chose ``a``, or ``a`` where it chose ``b``."""
    assert plan.keep.tolist() == [0, 1, 2] and plan.drop.tolist() == [3]
    return plan._replace(neighbors=1 - plan.neighbors)


def test_the_same_plan_agrees():
    x_before, x_after = rows(0.0)
    plan = plan_of(x_before, x_after)
    assert_plans_agree(plan, plan, x_before, x_after)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_another_neighbour_at_a_near_tie_passes(fraction):
    resolution = plan_resolution(torch.zeros(1, 4), torch.float32)
    # Squared distances 1 and (1 + delta)^2 ~ 1 + 2 delta; the largest squared norm is 9.
    x_before, x_after = rows(fraction * resolution * 9 / 2)
    plan = plan_of(x_before, x_after)
    assert_plans_agree(the_other_neighbour(plan), plan, x_before, x_after)


def test_another_neighbour_beyond_the_resolution_fails():
    x_before, x_after = rows(1e-3)
    plan = plan_of(x_before, x_after)
    with pytest.raises(AssertionError, match="neighbours differ"):
        assert_plans_agree(the_other_neighbour(plan), plan, x_before, x_after)


def test_another_selection_beyond_a_near_tie_fails():
    x_before, x_after = rows(0.0)
    plan = plan_of(x_before, x_after)
    swapped = plan._replace(keep=torch.tensor([0, 1, 3]), drop=torch.tensor([2]))  # d kept instead of c
    with pytest.raises(AssertionError, match="selections differ"):
        assert_plans_agree(swapped, plan, x_before, x_after)
