"""Formula 3 (the key-neuron regression loss) on dense and convolutional outputs, and M_T."""
from __future__ import annotations

import torch

from worker.engine.graph import analyze
from worker.engine.profiling import run_recording
from worker.engine.transform import build_mt, key_neuron_loss

from .tiny import trained


def test_dense_output_loss_is_the_mean_squared_error_over_the_key_neurons():
    out = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    keys = torch.tensor([True, False, True])
    # key neurons 0 and 2: errors 1, 2 | -1, -1
    assert float(key_neuron_loss(out, target, keys)) == (1 + 4 + 1 + 1) / 4
    # one sample, one key neuron: its squared error
    one = torch.tensor([False, False, True])
    assert float(key_neuron_loss(out[:1], target[:1], one)) == 4.0


def test_a_channel_is_one_neuron_with_all_its_positions():
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    keys = torch.tensor([False, True, True])
    want = (out - target)[:, 1:].pow(2).mean()
    assert torch.allclose(key_neuron_loss(out, target, keys), want)
    assert key_neuron_loss(out, target, keys).dim() == 0


def test_a_class_without_key_neurons_learns_nothing():
    out = torch.randn(2, 3, requires_grad=True)
    loss = key_neuron_loss(out, torch.zeros(2, 3), torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(out.grad, torch.zeros(2, 3))


def test_mt_computes_the_cut_and_shares_the_parameters():
    gm, _, data = trained()
    cut = analyze(gm).cut(1)[1]
    mt = build_mt(gm, cut)
    x = data.x_test[:5]
    with torch.no_grad():
        want = run_recording(gm, x, {cut})[cut]
        assert torch.equal(mt(x), want) and want.shape == (5, 32)
    assert mt.get_parameter("fc1.weight") is gm.get_parameter("fc1.weight")
