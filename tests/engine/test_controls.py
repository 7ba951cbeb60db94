"""The weight-noise control: DARE's change of weights, in size and place, with a random direction."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from worker.engine.controls import weight_noise_like


def _pair():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed[0].weight[:2] += 0.3 * torch.randn(2, 6)  # a method moved two rows ...
        changed[2].bias += torch.tensor([0.5, 0.0, -0.2])  # ... and two biases
        changed[1].running_mean += 1.0  # a buffer: not the control's business
    return original, changed


def test_noise_moves_exactly_what_the_method_moved_by_the_same_norm():
    original, changed = _pair()
    noisy, info = weight_noise_like(original, changed, seed=3)
    want = dict(changed.named_parameters())
    for name, p in noisy.named_parameters():
        p0 = dict(original.named_parameters())[name]
        d, dm = p - p0, want[name] - p0
        assert torch.equal(d != 0, dm != 0), name  # the same elements, no others
        assert abs(float(d.norm()) - float(dm.norm())) < 1e-5, name
        if dm.norm() > 0:
            assert not torch.allclose(d, dm), name  # a different direction
    assert torch.equal(noisy[1].running_mean, original[1].running_mean)
    assert info["weights_changed"] == 12 + 2
    total = sum(float((want[n] - p).norm()) ** 2 for n, p in original.named_parameters()) ** 0.5
    assert abs(info["l2_norm"] - total) < 1e-5


def test_noise_is_seeded_and_leaves_the_original_alone():
    original, changed = _pair()
    before = copy.deepcopy(original.state_dict())
    a, _ = weight_noise_like(original, changed, seed=1)
    b, _ = weight_noise_like(original, changed, seed=1)
    c, _ = weight_noise_like(original, changed, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a[0].weight, c[0].weight)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
