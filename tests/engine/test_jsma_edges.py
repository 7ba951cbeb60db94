"""JSMA at its edges, on models whose gradients are known exactly (linear logits on tiny images):
the two vector-Jacobian products, the target rule, theta's sign and size, one image on its own,
and the exact pair search where its pruning bound and its chunking matter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.attacks.base import AttackParamError
from worker.engine.attacks.jsma import JSMA, best_pairs


class SumModel(nn.Module):
    """Two classes on 4x4 grey images: logits (-sum, sum - 8), so class 1 iff the sum is above 4
    (a tie is class 0). Each pixel's gradient is -1 for class 0 and +1 for class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1)
        return torch.stack([-s, s - 8], 1)


def test_the_gradients_are_the_target_row_and_the_sum_of_the_others():
    w = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, -3.0, 1.0, 2.0], [-2.0, 1.0, 4.0, 0.0]])
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    t = torch.tensor([0, 2, 1])
    g_t, g_o = JSMA._grads(x @ w.T, x, t)
    assert torch.allclose(g_t, w[t])
    assert torch.allclose(g_o, w.sum(0) - w[t])


def test_two_classes_target_the_other_one():
    y = torch.tensor([0, 1, 1, 0])
    for target in ("random", "next"):
        assert JSMA(SumModel(), target=target).targets(y, 2).tolist() == [1, 0, 0, 1]


def test_labels_outside_the_classes_are_refused():
    atk = JSMA(SumModel())
    edge = torch.tensor([0, 3])  # the first and the last class are labels like any other
    assert (atk.targets(edge, 4) != edge).all()
    assert atk.targets(torch.tensor([], dtype=torch.long), 4).numel() == 0
    for bad in ([-1, 2], [0, 4]):
        with pytest.raises(ValueError, match="labels must lie in"):
            atk.targets(torch.tensor(bad), 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        atk.targets(torch.tensor([0]), 1)


def test_random_targets_cover_every_other_class_and_never_the_label():
    y = torch.zeros(3000, dtype=torch.long)
    t = JSMA(SumModel(), target="random", seed=5).targets(y, 4)
    assert set(t.tolist()) == {1, 2, 3}
    counts = torch.bincount(t, minlength=4)[1:].float()
    assert (counts / 3000 - 1 / 3).abs().max() < 0.05  # uniform over the other classes


@pytest.mark.parametrize("theta, start, label, pairs", [(0.5, 0.2, 0, 1), (-0.5, 0.5, 1, 4)])
def test_a_fractional_theta_moves_one_image_the_right_way(theta, start, label, pairs):
    """theta = 0.5 adds 0.5 to each chosen pixel, theta = -0.5 takes it away; a single image is
    attacked like a batch of them, and the attack stops as soon as the target class is reached
    (sum 3.2 + 1 > 4 after one pair; sum 8 - 4 = 4, a tie, class 0, after four)."""
    x = torch.full((1, 1, 4, 4), start)
    out = JSMA(SumModel(), theta=theta, gamma=1.0)(x, torch.tensor([label]))
    d = (out - x).flatten()
    assert int((d != 0).sum()) == 2 * pairs
    assert torch.allclose(d[d != 0], torch.full((2 * pairs,), theta))
    assert int(SumModel()(out).argmax(1)) == 1 - label


def test_theta_must_lie_in_minus_one_to_one_and_the_seed_be_a_natural_number():
    for ok in (1.0, -1.0, 0.25):
        assert JSMA(SumModel(), theta=ok).theta == ok
    for bad in (1.5, -1.5):
        with pytest.raises(AttackParamError, match="theta"):
            JSMA(SumModel(), theta=bad)
    assert JSMA(SumModel(), seed=0).seed == 0
    with pytest.raises(AttackParamError, match="seed"):
        JSMA(SumModel(), seed=-1)


def _score(a, c, p, q):
    r = torch.arange(len(a))
    return (a[r, p] + a[r, q]) * (c[r, p] + c[r, q])


def test_the_pair_search_on_two_features_and_on_one():
    p, q, found = best_pairs(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]),
                             torch.ones(1, 2, dtype=torch.bool))
    assert found.tolist() == [True] and {int(p), int(q)} == {0, 1}
    p, q, found = best_pairs(torch.ones(2, 1), torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool))
    assert found.tolist() == [False, False]


@pytest.mark.parametrize("swap", [False, True])
def test_the_best_pair_can_lie_outside_both_candidate_lists(swap):
    """Eight features lead on a (a 10, c -5), eight on c (a 9, c 10); the best pair of the
    candidates scores (9 + 9)(10 + 10) = 360, but feature 16 (a 9.9, c 9.9) is in neither top
    eight and pairs with a c-leader for 18.9 * 19.9 = 376.1. Only a pruning bound that really
    bounds every pair with an outsider sends the search on to find it (and so with a and c
    swapped)."""
    a = torch.empty(1, 17, dtype=torch.float64)  # 17 > 2 x 8: the candidate round runs
    c = a.clone()
    a[0, :8], c[0, :8] = 10.0, -5.0
    a[0, 8:16], c[0, 8:16] = 9.0, 10.0
    a[0, 16], c[0, 16] = 9.9, 9.9
    if swap:
        a, c = c, a
    p, q, found = best_pairs(a, c, torch.ones(1, 17, dtype=torch.bool))
    assert found.tolist() == [True] and 16 in (int(p), int(q))
    assert float(_score(a, c, p, q)) == pytest.approx(18.9 * 19.9)


def test_the_exhaustive_search_over_more_pairs_than_one_chunk_holds():
    """3,000 features have 4.5 million pairs, more than one chunk of the exhaustive search (the
    candidate rounds cannot conclude: the leaders on a and on c only pair badly)."""
    n = 3000
    a = torch.ones(1, n, dtype=torch.float64)
    c = a.clone()
    a[0, :1000], c[0, :1000] = 10.0, -100.0
    a[0, 1000:2000], c[0, 1000:2000] = -100.0, 10.0
    a[0, 2500] = c[0, 2600] = 1.5  # the best pair: (1.5 + 1)(1 + 1.5)
    p, q, found = best_pairs(a, c, torch.ones(1, n, dtype=torch.bool))
    assert found.tolist() == [True] and {int(p), int(q)} == {2500, 2600}
