"""The report's perturbation statistics on hand-made numbers: the three norms, quartiles with
failures counted, the accuracy curve's budgets, and the L2 bound at its edge."""
from __future__ import annotations

import math

import pytest
import torch

from worker.engine.evaluation import bound_l2, budget_grid, perturbation_norms, size_stats


def test_the_three_norms_of_a_perturbation():
    x = torch.zeros(2, 1, 2, 2)
    adv = x.clone()
    adv[0, 0, 0, 0], adv[0, 0, 1, 1] = 0.3, -0.4
    adv[1, 0, 0, 1] = 5e-7  # below the L0 threshold of 1e-6: not a change
    assert perturbation_norms("linf", x, adv).tolist() == pytest.approx([0.4, 5e-7])
    assert perturbation_norms("l2", x, adv).tolist() == pytest.approx([0.5, 5e-7])
    assert perturbation_norms("l0", x, adv).tolist() == [2.0, 0.0]
    assert perturbation_norms("linf", x[:, :, :0], adv[:, :, :0]).tolist() == [0.0, 0.0]


def test_quartiles_count_the_failed_points():
    s = size_stats(torch.tensor([0.1, 0.2, 0.3, 0.4, math.inf]))
    assert s["n"] == 5 and s["failed"] == 1
    assert s["q1"] == pytest.approx(0.2) and s["median"] == pytest.approx(0.3)
    assert s["q3"] == pytest.approx(0.4)
    assert size_stats(torch.tensor([])) == {"n": 0, "median": None, "q1": None, "q3": None,
                                            "failed": 0}


def test_the_curve_budgets_run_from_0_to_the_largest_size_rounded_up():
    grid = budget_grid({"fgsm": torch.tensor([0.05, 0.1234, math.inf]), "cw": torch.tensor([])})
    assert len(grid) == 11 and grid[0] == 0.0 and grid[-1] == 0.124  # 0.1234 rounded up
    assert grid[5] == pytest.approx(0.062) and grid == sorted(grid)
    assert budget_grid({"a": torch.tensor([2.5])}, steps=6) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert budget_grid({"a": torch.tensor([math.inf])})[-1] == 1.0  # nothing finite: 0 .. 1


def test_the_l2_bound_keeps_a_perturbation_exactly_at_the_radius():
    x = torch.zeros(3, 1, 1, 2)
    adv = torch.tensor([[[[0.3, 0.4]]], [[[0.6, 0.8]]], [[[0.0, 0.2]]]])  # L2 0.5, 1.0, 0.2
    out = bound_l2(x, adv, 0.5)
    assert torch.equal(out[0], adv[0]) and torch.equal(out[1], x[1]) and torch.equal(out[2], adv[2])


def test_a_change_of_exactly_the_l0_threshold_is_not_counted():
    x = torch.zeros(1, 1, 1, 3)
    adv = torch.tensor([[[[1e-6, 2e-6, 0.0]]]])  # float32: the first is the threshold itself
    assert perturbation_norms("l0", x, adv).tolist() == [1.0]
