"""Reference subjects: the four architectures and the trainer that writes a job's inputs."""
from __future__ import annotations

import json
import zipfile

import onnx
import onnx.numpy_helper
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from worker.engine.data import load_embedded, load_npz
from worker.engine.reference import ARCHS, build, train_reference


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_build_gives_logits_for_any_input(arch, in_shape):
    torch.manual_seed(0)
    m = build(arch, in_shape, 7).eval()
    assert m(torch.rand(3, *in_shape)).shape == (3, 7)


def test_architectures_have_their_defining_parts():
    kinds = {a: {type(m) for m in build(a, (1, 28, 28), 10).modules()} for a in ARCHS}
    assert nn.Conv2d not in kinds["mlp"] and nn.Linear in kinds["mlp"]
    assert {nn.Conv2d, nn.MaxPool2d} <= kinds["lenet"] and nn.BatchNorm2d not in kinds["lenet"]
    assert {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.Dropout} <= kinds["vgg"]
    assert {nn.BatchNorm2d, nn.Identity, nn.AdaptiveAvgPool2d} <= kinds["resnet"]
    r = build("resnet", (1, 8, 8), 10)
    assert isinstance(r.layer1.shortcut, nn.Identity)  # identity shortcut
    assert r.layer2.shortcut[0].kernel_size == (1, 1)  # 1x1-conv shortcut
    with pytest.raises(ValueError, match="unknown arch"):
        build("transformer", (1, 8, 8), 10)


def test_trainer_writes_a_complete_reproducible_job(tmp_path):
    splits = load_embedded("digits")
    r = train_reference("lenet", splits, 3, tmp_path / "a", seed=0)
    for key in ("model_pt2", "model_onnx", "history_zip", "data_npz"):
        assert r[key].exists(), key
    assert [p.name for p in r["checkpoints"]] == [f"epoch_{k}.safetensors" for k in (1, 2, 3)]
    with zipfile.ZipFile(r["history_zip"]) as zf:
        names = sorted(zf.namelist())
        man = json.loads(zf.read("manifest.json"))
    assert names == ["epoch_1.safetensors", "epoch_2.safetensors", "epoch_3.safetensors",
                     "manifest.json"]
    assert man["arch"] == "lenet" and man["dataset"] == "digits" and man["num_classes"] == 10
    with safe_open(str(r["checkpoints"][0]), "pt") as f:
        assert json.loads(f.metadata()["epoch"]) == 1
    # epochs differ from each other (a history worth mining)
    e1, e3 = (load_file(str(p)) for p in (r["checkpoints"][0], r["checkpoints"][2]))
    assert not torch.equal(e1["fc3.weight"], e3["fc3.weight"])
    # the data it trained on round-trips
    d = load_npz(r["data_npz"])
    assert torch.equal(d.x_train, splits.x_train) and torch.equal(d.y_test, splits.y_test)
    # the ONNX file is opset 17 with a dynamic batch and state-dict initializer names
    proto = onnx.load(str(r["model_onnx"]))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert set(e3) - {k for k in e3 if "num_batches" in k} <= {i.name for i in proto.graph.initializer}
    # seeded: a second run writes bit-identical checkpoints
    r2 = train_reference("lenet", splits, 3, tmp_path / "b", seed=0)
    for p, q in zip(r["checkpoints"], r2["checkpoints"]):
        a, b = load_file(str(p)), load_file(str(q))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert r2["test_accuracy"] == r["test_accuracy"]


def test_residual_biases_keep_their_own_onnx_initializers(tmp_path):
    # The two BatchNorms summed in a residual block get equal bias gradients, stay equal, and
    # the legacy exporter would store them once behind an Identity node.
    r = train_reference("resnet", load_embedded("digits"), 1, tmp_path)
    proto = onnx.load(str(r["model_onnx"]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    a, b = inits["layer2.bn2.bias"], inits["layer2.shortcut.1.bias"]
    assert (a == b).all()  # the case that triggers the exporter's deduplication
    assert "Identity" not in {n.op_type for n in proto.graph.node}


def test_mlp_on_digits_learns_in_seconds(tmp_path):
    r = train_reference("mlp", "digits", 10, tmp_path)
    assert r["test_accuracy"] >= 0.93  # about 0.97 with the defaults (seed 0)
    assert r["epochs"] == 10 and len(r["checkpoints"]) == 10


def test_trainer_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        train_reference("transformer", "digits", 1, tmp_path)
    with pytest.raises(ValueError, match="epochs"):
        train_reference("mlp", "digits", 0, tmp_path)
