"""The paper's architectures (VGG16, VGG19, AlexNet) and ResNet-18 on 3-channel 32x32 data: built
at a fraction of their width, trained, and hardened through every stage of the engine."""
from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch

from worker.cli import main as cli
from worker.engine.data import Splits
from worker.engine.reference import PAPER_ARCHS, build, train_reference

WIDTH = 1 / 16  # the tests' networks; full width is 15-36 M parameters
TINY = {"evaluation": {"n_samples": 12, "attacks": ["fgsm"], "adaptive": True},
        "tune": {"epochs": 1}, "history_fraction": 1.0}


def colour_splits(n: int = 24, classes: int = 3, seed: int = 0) -> Splits:
    """Synthetic colour images a small net can learn: each class a different dominant channel."""
    g = torch.Generator().manual_seed(seed)

    def make(k: int):
        y = torch.arange(k) % classes
        x = torch.rand(k, 3, 32, 32, generator=g) * 0.5
        x[torch.arange(k), y] += 0.5
        return x.clamp(0, 1), y

    (xt, yt), (xv, yv), (xs, ys) = make(n), make(n), make(n)
    return Splits("upload", xt, yt, xv, yv, xs, ys, classes)


@pytest.mark.parametrize("arch,params", [("vgg16", 14.7e6), ("vgg19", 20.0e6),
                                         ("alexnet", 35.9e6), ("resnet18", 11.2e6)])
def test_full_width_parameter_counts_match_the_usual_small_image_variants(arch, params):
    n = sum(p.numel() for p in build(arch, (3, 32, 32), 10).parameters())
    assert n == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_paper_archs_take_fashion_and_cifar_sized_inputs(shape):
    for arch in PAPER_ARCHS:
        m = build(arch, shape, 10, width=WIDTH).eval()
        assert m(torch.rand(2, *shape)).shape == (2, 10), arch
    with pytest.raises(ValueError, match="width"):
        build("vgg16", shape, 10, width=0)


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_paper_arch_hardens_end_to_end_on_colour_data(arch, tmp_path):
    splits = colour_splits()
    r = train_reference(arch, splits, 2, tmp_path / "subject", width=WIDTH, lr_schedule="cosine")
    assert json.loads(_manifest(r["history_zip"]))["width"] == WIDTH
    out = tmp_path / "out"
    rc = cli(["harden", "--model", str(r["model_onnx"]), "--history", str(r["history_zip"]),
              "--data", str(r["data_npz"]), "--out", str(out), "--config", json.dumps(TINY)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mining"]["mined"] >= 0 and report["attacks"]["fgsm"]
    sess = ort.InferenceSession(str(out / "hardened.onnx"))
    y = sess.run(None, {sess.get_inputs()[0].name: splits.x_test[:4].numpy()})[0]
    assert y.shape == (4, 3)


def _manifest(path) -> str:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return zf.read("manifest.json").decode()
