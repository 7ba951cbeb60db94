import pytest
import torch
import torch.nn as nn

from worker.engine.errors import InputError, UnsupportedOp
from worker.engine.graph import analyze, plain_graph_module, truncate

from .tiny import TinyNet, trained


def _export(m, shape=(2, 1, 8, 8)):
    ep = torch.export.export(m.eval(), (torch.rand(*shape),))
    return plain_graph_module(ep.module())


def test_layers_norms_and_producers_of_a_residual_cnn():
    gm, _, _ = trained()
    info = analyze(gm)
    assert [(layer.kind, layer.weight_key) for layer in info.layers] == [
        ("conv", "c1.weight"), ("conv", "c2.weight"), ("linear", "fc1.weight"), ("linear", "fc2.weight")]
    assert [n.weight_key for n in info.norms] == ["bn.weight"]
    names = [layer.node for layer in info.layers]
    # the residual addition feeds fc1 from both convolutions
    assert set(info.producers[names[2]]) == {names[0], names[1]}
    assert info.producers[names[3]] == [names[2]]


def test_cut_skips_back_to_the_previous_parametric_layer():
    gm, _, data = trained()
    info = analyze(gm)
    k, cut = info.cut(1)
    assert k == 3
    mt = truncate(gm, cut)
    out = mt(data.x_test[:5])
    assert out.shape == (5, 32)  # what fc2 receives: fc1 -> relu -> dropout
    assert mt.get_parameter("fc1.weight") is gm.get_parameter("fc1.weight")
    assert not any(n == "fc2.weight" for n, _ in mt.named_parameters())
    with pytest.raises(InputError, match="between 1 and 3"):
        info.cut(4)


class _TwoBranch(nn.Module):
    """conv_a(x) + shortcut(x): the two convolutions sit side by side."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.short = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.a(x)) + self.short(x), 1))


def test_cut_inside_a_residual_block_is_refused():
    info = analyze(_export(_TwoBranch()))
    assert info.cut(1)[0] == 2
    with pytest.raises(InputError, match="residual"):
        info.cut(2)  # M_T would keep conv a but not the shortcut that joins it


def test_onnx2torch_graph_gives_the_same_structure(tmp_path):
    onnx2torch = pytest.importorskip("onnx2torch")
    m = TinyNet().eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (torch.rand(2, 1, 8, 8),), path, opset_version=17, dynamo=False,
                      do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    info = analyze(onnx2torch.convert(str(path)))
    assert [layer.kind for layer in info.layers] == ["conv", "conv", "linear", "linear"]
    assert len(info.norms) == 1


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.fc2 = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc2(self.fc(torch.flatten(torch.sort(self.c(x), dim=1).values, 1)))


def test_unsupported_op_is_named():
    with pytest.raises(UnsupportedOp, match="sort"):
        analyze(_export(_Odd()))


def test_single_layer_model_is_refused():
    with pytest.raises(InputError, match="1 conv/linear"):
        analyze(_export(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))))
