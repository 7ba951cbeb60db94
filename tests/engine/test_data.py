"""Data loading: the .npz upload format, the embedded datasets, and checks against the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.data import (EMBEDDED, Splits, check_data_against_model, load_data,
                                load_embedded, load_npz, save_npz)
from worker.engine.errors import InputError


def _arrays(n=(12, 4, 4), c=1, hw=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for s, k in zip(("train", "val", "test"), n):
        out[f"x_{s}"] = rng.random((k, c, hw, hw), dtype=np.float32)
        out[f"y_{s}"] = np.arange(k) % classes
    return out


def _write(tmp_path, arrays, name="data.npz"):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def _err(path) -> InputError:
    with pytest.raises(InputError) as ei:
        load_npz(path)
    return ei.value


def test_npz_roundtrip_and_num_classes(tmp_path):
    a = _arrays(classes=3)
    a["y_test"][0] = 4  # a class seen only in test still counts
    s = load_npz(_write(tmp_path, a))
    assert s.name == "upload" and s.num_classes == 5
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.x_train.shape == (12, 1, 8, 8) and s.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(s.x_val.numpy(), a["x_val"])
    out = save_npz(s, tmp_path / "again.npz")
    s2 = load_npz(out)
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(s, k), getattr(s2, k)), k
    assert s2.num_classes == s.num_classes


def test_uint8_is_scaled_and_nhw_gets_a_channel(tmp_path):
    a = _arrays()
    for s in ("train", "val", "test"):
        a[f"x_{s}"] = (a[f"x_{s}"][:, 0] * 255).astype(np.uint8)  # (N, H, W) uint8
    s = load_npz(_write(tmp_path, a))
    assert s.x_train.shape == (12, 1, 8, 8)
    assert float(s.x_train.max()) <= 1.0
    np.testing.assert_allclose(s.x_train[:, 0].numpy(), a["x_train"] / 255.0, rtol=1e-6)


@pytest.mark.parametrize("mutate, code, words", [
    (lambda a: a.pop("y_val"), "data_missing_key", ["y_val", "data.npz"]),
    (lambda a: a.__setitem__("x_train", a["x_train"] * 255), "data_out_of_range", ["x_train", "[0, 1]"]),
    (lambda a: a.__setitem__("x_test", a["x_test"][:0]) or a.__setitem__("y_test", a["y_test"][:0]),
     "data_empty_split", ["test"]),
    (lambda a: a["y_train"].__setitem__(0, -1), "data_bad_labels", ["y_train", "negative"]),
    (lambda a: a.__setitem__("y_train", a["y_train"] + 0.5), "data_bad_labels", ["y_train"]),
    (lambda a: a["x_val"].__setitem__((0, 0, 0, 0), np.nan), "data_not_finite", ["x_val"]),
    (lambda a: a.__setitem__("x_val", np.repeat(a["x_val"], 3, axis=1)), "data_shape_mismatch",
     ["val (3, 8, 8)", "train (1, 8, 8)"]),
    (lambda a: a.__setitem__("x_train", a["x_train"].transpose(0, 2, 3, 1)), "data_bad_shape",
     ["channels-last"]),
    (lambda a: a.__setitem__("x_train", a["x_train"].reshape(12, -1)), "data_bad_shape", ["x_train"]),
    (lambda a: a.__setitem__("y_train", a["y_train"][:5]), "data_bad_shape", ["y_train"]),
    (lambda a: a.__setitem__("x_train", (a["x_train"] * 9).astype(np.int32)), "data_bad_dtype",
     ["int32"]),
])
def test_npz_validation_errors(tmp_path, mutate, code, words):
    a = _arrays()
    mutate(a)
    e = _err(_write(tmp_path, a))
    assert e.code == code, e.message
    for w in words:
        assert w in e.message, (w, e.message)
    assert e.hint


def test_unreadable_and_pickled_npz_are_refused(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip at all")
    assert _err(p).code == "data_unreadable"
    a = _arrays()
    a["x_train"] = np.array([object()] * 3, dtype=object)  # needs pickle to load
    assert _err(_write(tmp_path, a, "obj.npz")).code == "data_unreadable"


def test_digits_split_is_stratified_seeded_and_disjoint():
    s = load_embedded("digits", seed=0)
    assert s.name == "digits" and s.num_classes == 10
    n = [len(s.y_train), len(s.y_val), len(s.y_test)]
    assert sum(n) == 1797 and abs(n[0] - 0.6 * 1797) < 10 and abs(n[1] - 0.2 * 1797) < 10
    assert s.x_train.shape[1:] == (1, 8, 8) and s.x_train.dtype == torch.float32
    assert 0 <= float(s.x_test.min()) and float(s.x_test.max()) <= 1
    # stratified: every class keeps (about) its share in every split
    full = torch.bincount(torch.cat([s.y_train, s.y_val, s.y_test]), minlength=10).float()
    for y, frac in ((s.y_train, 0.6), (s.y_val, 0.2), (s.y_test, 0.2)):
        assert (torch.bincount(y, minlength=10) - frac * full).abs().max() <= 1.0
    # disjoint: no image appears in two splits (digits has a few exact duplicates, so compare
    # counts of rows rather than assume all rows are unique)
    rows = torch.cat([s.x_train, s.x_val, s.x_test]).flatten(1)
    assert len(rows) == 1797
    again = load_embedded("digits", seed=0)
    assert torch.equal(again.x_train, s.x_train) and torch.equal(again.y_val, s.y_val)
    other = load_embedded("digits", seed=1)
    assert not torch.equal(other.y_train, s.y_train)


def test_mnist5k_is_embedded_and_scaled():
    s = load_embedded("mnist5k")
    assert s.x_train.shape == (3000, 1, 28, 28) and len(s.y_val) == 1000 and len(s.y_test) == 1000
    assert s.num_classes == 10 and float(s.x_train.max()) == 1.0 and float(s.x_train.min()) == 0.0


def test_unknown_dataset_lists_the_embedded_ones():
    with pytest.raises(InputError) as ei:
        load_embedded("cifar10")
    assert ei.value.code == "unknown_dataset"
    for name in EMBEDDED:
        assert name in ei.value.hint


def test_load_data_prefers_the_upload(tmp_path):
    p = _write(tmp_path, _arrays())
    assert load_data(p, "digits").name == "upload"
    assert load_data(None, "digits").name == "digits"
    with pytest.raises(InputError) as ei:
        load_data(None, None)
    assert ei.value.code == "no_data"


def _splits(c=1, hw=8, top_label=9):
    x = torch.rand(4, c, hw, hw)
    y = torch.tensor([0, 1, 2, top_label])
    return Splits("upload", x, y, x, y, x, y, top_label + 1)


@pytest.mark.parametrize("splits, words", [
    (_splits(c=3), ["3-channel", "1 channel"]),
    (_splits(hw=28), ["28x28", "8x8"]),
    (_splits(top_label=10), ["label 10", "10 outputs"]),
])
def test_data_against_model(splits, words):
    with pytest.raises(InputError) as ei:
        check_data_against_model(splits, (1, 8, 8), 10)
    assert ei.value.code == "data_model_mismatch"
    for w in words:
        assert w in ei.value.message, (w, ei.value.message)


def test_matching_data_passes():
    check_data_against_model(_splits(), (1, 8, 8), 10)


def test_val_fraction_gives_the_papers_split_and_reaches_the_jobs_data(tmp_path):
    s = load_embedded("digits", seed=0, val_fraction=0.5)  # the paper: train data halved
    n = [len(s.y_train), len(s.y_val), len(s.y_test)]
    assert sum(n) == 1797 and abs(n[0] - n[1]) <= 10 and abs(n[2] - 0.2 * 1797) < 10
    default = load_embedded("digits", seed=0)
    # the test split holds the same images (in another order: the final shuffle draws after
    # the other parts')
    def rows(x):
        return sorted(map(bytes, x.flatten(1).mul(16).round().to(torch.uint8).numpy()))

    assert rows(default.x_test) == rows(s.x_test)
    # the job's config reaches the stages' data
    from worker.engine.config import parse_config
    from worker.engine.stages import StageContext, load_inputs
    from worker.engine.reference.train import train_reference

    r = train_reference("mlp", "digits", 1, tmp_path / "subj", val_fraction=0.5)
    wd = tmp_path / "job"
    (wd / "inputs").mkdir(parents=True)
    for f in ("model.pt2", "history.zip"):
        (wd / "inputs" / f).write_bytes((tmp_path / "subj" / f).read_bytes())
    _, _, splits = load_inputs(StageContext(wd, parse_config({"dataset": "digits",
                                                                 "val_fraction": 0.5})))
    assert len(splits.y_val) == len(s.y_val) and torch.equal(splits.y_train, s.y_train)
    assert r["val_accuracy"] >= 0
    with pytest.raises(Exception, match="val_fraction"):
        parse_config({"val_fraction": 1.0})
