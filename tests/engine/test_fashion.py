"""The embedded Fashion-MNIST: parsed from the Debian package's idx files, split as the paper does,
and a clear error naming the package where the files are missing."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from worker.engine import data
from worker.engine.errors import InputError
from worker.engine.idx import IdxError, read_idx


def _write_idx(path, a: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + a.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A tiny stand-in in the original file layout: 40 train images (4 per class), 10 test."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 28, 28)), "y_train": np.arange(40) % 10,
              "x_test": rng.integers(0, 256, (10, 28, 28)), "y_test": np.arange(10)}
    for key, name in data.FASHION_FILES.items():
        _write_idx(tmp_path / name, arrays[key])
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    data._fashion_raw.cache_clear()
    yield tmp_path, arrays
    data._fashion_raw.cache_clear()


def test_read_idx_round_trips_and_refuses_a_lying_header(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    head = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 5)  # claims 30 bytes, holds 24
    (tmp_path / "b").write_bytes(head + a.tobytes())
    with pytest.raises(IdxError, match="declares shape"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"\x80\x02}q\x00.")  # a pickle is not an idx file
    with pytest.raises(IdxError, match="magic"):
        read_idx(tmp_path / "c")


def test_fashion_is_split_half_and_half_with_the_official_test_set(fake_fashion):
    _, raw = fake_fashion
    s = data.load_embedded("fashion", seed=3)
    assert s.name == "fashion" and s.num_classes == 10 and s.input_shape == (1, 28, 28)
    assert len(s.y_train) == len(s.y_val) == 20  # the paper's 50/50 split of the training data
    assert torch.bincount(s.y_train, minlength=10).tolist() == [2] * 10  # stratified
    assert torch.equal(s.y_test, torch.from_numpy(raw["y_test"]))
    assert torch.allclose(s.x_test[:, 0] * 255, torch.from_numpy(raw["x_test"]).float())
    # train and val are disjoint and together are the official training set
    seen = torch.cat([s.x_train, s.x_val]).flatten(1).mul(255).round().to(torch.uint8)
    want = torch.from_numpy(raw["x_train"].astype(np.uint8)).flatten(1)
    assert sorted(map(bytes, seen.numpy())) == sorted(map(bytes, want.numpy()))
    again = data.load_embedded("fashion", seed=3)
    assert torch.equal(again.y_train, s.y_train)  # seeded
    assert not torch.equal(data.load_embedded("fashion", seed=4).y_train, s.y_train)


def test_missing_files_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    data._fashion_raw.cache_clear()
    with pytest.raises(InputError) as e:
        data.load_embedded("fashion")
    data._fashion_raw.cache_clear()
    assert e.value.code == "dataset_unavailable"
    assert "dataset-fashion-mnist" in e.value.hint


# CI installs the package (.ci/run), so there a missing install is a failure, not a skip.
@pytest.mark.skipif(not (data.FASHION_DIR / data.FASHION_FILES["x_train"]).is_file()
                    and not os.environ.get("CI"),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install "
                           "dataset-fashion-mnist)")
def test_the_installed_package_is_the_full_dataset(monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    data._fashion_raw.cache_clear()
    s = data.load_embedded("fashion")
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (30000, 30000, 10000)
    assert torch.bincount(s.y_test).tolist() == [1000] * 10
    assert 0.0 <= float(s.x_train.min()) and float(s.x_train.max()) == 1.0
