"""Writing the hardened model: safetensors, ONNX (checked in onnxruntime) and .pt2."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper
from safetensors.torch import load_file

import worker.engine.export as export_mod
from worker.engine.data import load_embedded
from worker.engine.export import export_onnx, export_pt2, onnx_logits, write_hardened
from worker.engine.modelio import load_model
from worker.engine.reference import ARCHS, train_reference


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects")
    splits = load_embedded("digits")
    return {a: train_reference(a, splits, 2, root / a) for a in ARCHS}, splits


def _perturbed(lm, seed=0):
    """A 'hardened' GM state: every parameter moved, buffers as they were."""
    g = torch.Generator().manual_seed(seed)
    params = dict(lm.gm.named_parameters())
    state = {}
    for k, v in lm.gm.state_dict().items():
        if k in params:
            v = v + 0.01 * torch.randn(v.shape, generator=g)
        state[k] = v.detach().clone()
    return state


def _logits(lm, state, x):
    import copy

    gm = copy.deepcopy(lm.gm)
    gm.load_state_dict(state, strict=False)
    with torch.no_grad():
        return gm(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_input_keeps_its_graph_and_replaces_initializers(subjects, tmp_path, arch):
    subs, splits = subjects
    lm = load_model(subs[arch]["model_onnx"])
    state = _perturbed(lm)
    x = splits.x_test[:64]
    out = write_hardened(lm, state, tmp_path, x)
    assert set(out) == {"hardened.onnx", "hardened.safetensors"}
    canon = lm.canonical_state(state)
    hard = onnx.load(str(out["hardened.onnx"]))
    orig = onnx.load(str(lm.path))
    # same graph: same nodes in the same order (deduplicated initializers aside, see
    # modelio.normalize_onnx), same opset
    assert [n.op_type for n in hard.graph.node] == [
        n.op_type for n in orig.graph.node if n.op_type != "Identity"]
    assert hard.opset_import == orig.opset_import
    inits = {i.name: numpy_helper.to_array(i) for i in hard.graph.initializer}
    assert set(canon) <= set(inits)
    for k, v in canon.items():
        np.testing.assert_array_equal(inits[k], v.numpy(), err_msg=k)
    st = load_file(str(out["hardened.safetensors"]))
    assert set(st) == set(canon) and all(torch.equal(st[k], canon[k]) for k in st)
    want = _logits(lm, state, x)
    assert np.abs(onnx_logits(out["hardened.onnx"], x) - want.numpy()).max() <= 1e-4
    # and it loads back as the hardened model
    again = load_model(out["hardened.onnx"])
    assert torch.allclose(again.gm(x), want, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_pt2_input_gets_pt2_and_checked_onnx(subjects, tmp_path, arch):
    subs, splits = subjects
    lm = load_model(subs[arch]["model_pt2"])
    state = _perturbed(lm)
    x = splits.x_test[:64]
    out = write_hardened(lm, state, tmp_path, x)
    assert set(out) == {"hardened.onnx", "hardened.pt2", "hardened.safetensors"}
    want = _logits(lm, state, x)
    pt2 = load_model(out["hardened.pt2"])
    assert torch.allclose(pt2.gm(x), want, atol=1e-6)
    proto = onnx.load(str(out["hardened.onnx"]))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    on = load_model(out["hardened.onnx"])  # the reference subjects round-trip through onnx2torch
    assert torch.allclose(on.gm(x), want, atol=1e-4)
    st = load_file(str(out["hardened.safetensors"]))
    assert set(st) == set(lm.name_map)  # pt2: canonical names are the GM's own
    assert all(torch.equal(st[k], state[k]) for k in st)


def test_a_failed_onnx_check_raises_with_the_difference(subjects, tmp_path, monkeypatch):
    subs, splits = subjects
    lm = load_model(subs["mlp"]["model_onnx"])
    real = export_mod.onnx_logits
    monkeypatch.setattr(export_mod, "onnx_logits", lambda p, x: real(p, x) + 0.5)
    with pytest.raises(RuntimeError, match=r"max \|logit difference\| = 0\.5"):
        write_hardened(lm, lm.gm.state_dict(), tmp_path, splits.x_test[:64])


def test_hardened_state_must_cover_every_parameter(subjects, tmp_path):
    subs, splits = subjects
    lm = load_model(subs["mlp"]["model_pt2"])
    state = dict(lm.gm.state_dict())
    del state["fc1.weight"]
    with pytest.raises(ValueError, match="fc1.weight"):
        write_hardened(lm, state, tmp_path, splits.x_test[:8])


class _ViewNet(nn.Module):
    """Flattens with x.view(x.size(0), -1): a graph that computes shapes from the batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(108, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def test_shape_computing_pt2_falls_back_to_the_dynamo_exporter(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    export_pt2(_ViewNet().eval(), x[:2], tmp_path / "v.pt2")
    lm = load_model(tmp_path / "v.pt2")
    out = write_hardened(lm, lm.gm.state_dict(), tmp_path / "out", x)
    with torch.no_grad():
        assert np.abs(onnx_logits(out["hardened.onnx"], x) - lm.gm(x).numpy()).max() <= 1e-4


def test_export_onnx_of_a_plain_module_keeps_names_and_batchnorm(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                      nn.Linear(72, 3)).eval()
    p = export_onnx(m, torch.rand(2, 1, 8, 8), tmp_path / "m.onnx")
    proto = onnx.load(str(p))
    assert "BatchNormalization" in [n.op_type for n in proto.graph.node]
    assert {"0.weight", "1.running_var", "4.weight"} <= {i.name for i in proto.graph.initializer}
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param  # dynamic batch
