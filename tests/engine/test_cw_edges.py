"""C&W L2 at its edges, on a model whose answer is fixed: where the search starts (the image
itself, pixels at exactly 0 and 1 included), the smallest step count, and the margin rule at
exactly kappa."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.attacks.base import AttackParamError
from worker.engine.attacks.cw import CW


def _always(cls: int, margin: float, n_classes: int = 3) -> nn.Module:
    """Logits independent of the input: ``cls`` beats every other class by ``margin``."""
    m = nn.Linear(4, n_classes)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
        m.bias[cls] = margin
    return nn.Sequential(nn.Flatten(), m).eval()


X = torch.tensor([[[[0.0, 1.0], [0.25, 0.5]]], [[[1.0, 1.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
Y = torch.tensor([0, 2])  # the model answers 1: every iterate is adversarial


def test_the_first_iterate_is_the_image_itself_pixels_at_0_and_1_included():
    """One Adam step: the only iterate judged is the starting point, which must be the image
    (within Carlini's atanh scale), so it is kept with an L2 of about zero."""
    adv, l2 = CW(_always(1, 5.0), steps=1)._optimise(X, Y, torch.ones(2))
    assert bool(torch.isfinite(l2).all()) and float(l2.max()) < 1e-9
    assert float((adv - X).abs().max()) < 1e-5


def test_one_step_is_the_smallest_count_allowed():
    assert CW(_always(1, 5.0), steps=1).params()["steps"] == 1
    with pytest.raises(AttackParamError):
        CW(_always(1, 5.0), steps=0)


def test_a_margin_of_exactly_kappa_is_adversarial():
    """f(x') = max(Z_y - max_j Z_j, -kappa) is zero from a margin of kappa on: such an iterate
    counts; a margin just short of kappa does not."""
    _, l2 = CW(_always(1, 2.0), kappa=2.0, steps=1)._optimise(X, Y, torch.ones(2))
    assert bool(torch.isfinite(l2).all())
    _, l2 = CW(_always(1, 1.5), kappa=2.0, steps=1)._optimise(X, Y, torch.ones(2))
    assert bool(torch.isinf(l2).all())
