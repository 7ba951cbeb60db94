"""Hostile and broken submissions, built fresh in a temporary directory.

A valid subject first (a two-layer ONNX classifier for 1x8x8 images, three history checkpoints
in safetensors, an .npz of random images), then each case breaks one thing. Every case says
which HTTP status and problem ``code`` the API must answer, words its ``detail`` must contain,
whether refusing it needs the inspector process (``deep``), and files that must not exist
afterwards (what a payload or a zip-slip would have written).
"""
from __future__ import annotations

import builtins
import io
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as st_save

CLASSES = 10
SHAPES = {"fc1.weight": (16, 64), "fc1.bias": (16,), "fc2.weight": (CLASSES, 16),
          "fc2.bias": (CLASSES,)}


@dataclass
class Case:
    name: str
    files: dict[str, tuple[str, bytes]]   # field -> (filename, content)
    fields: dict[str, str] = field(default_factory=dict)
    status: int = 422
    code: str = ""
    words: tuple[str, ...] = ()
    deep: bool = False                    # refused by the inspector, not by the cheap checks
    must_not_exist: tuple[Path, ...] = ()


# --- the valid subject ---------------------------------------------------------------------

def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * 0.1).astype(np.float32) for k, s in SHAPES.items()}


def model_onnx(w: dict[str, np.ndarray] | None = None, *, channels: int = 1) -> onnx.ModelProto:
    """x (N, C, 8, 8) -> Flatten -> Gemm -> Relu -> Gemm -> logits (N, 10)."""
    w = weights() if w is None else w
    if channels != 1:
        w = {**w, "fc1.weight": np.resize(w["fc1.weight"], (16, 64 * channels))}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["h"], transB=1),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["logits"], transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def history_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def checkpoints(n: int = 3) -> dict[str, bytes]:
    return {f"epoch_{e}.safetensors": st_save(weights(e)) for e in range(1, n + 1)}


def data_npz(*, channels: int = 1, max_label: int = CLASSES - 1, empty: str | None = None) -> bytes:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 20), ("val", 10), ("test", 10)):
        n = 0 if split == empty else n
        arrays[f"x_{split}"] = rng.integers(0, 256, size=(n, channels, 8, 8), dtype=np.uint8)
        y = rng.integers(0, CLASSES, size=n).astype(np.int64)
        if n:
            y[0] = max_label
        arrays[f"y_{split}"] = y
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def valid_files() -> dict[str, tuple[str, bytes]]:
    return {"model": ("model.onnx", model_onnx().SerializeToString()),
            "history": ("history.zip", history_zip(checkpoints())),
            "data": ("data.npz", data_npz())}


def valid_pt2_files() -> dict[str, tuple[str, bytes]]:
    """The same subject as real torch.export archives: a .pt2 model and .pt2 checkpoints, so
    the .pt2 refusals cannot come from a layout check that refuses what torch writes."""
    from .hostile_pt2 import mlp_pt2

    return {"model": ("model.pt2", mlp_pt2(0)),
            "history": ("history.zip", history_zip(
                {f"epoch_{e}.pt2": mlp_pt2(e) for e in range(1, 4)})),
            "data": ("data.npz", data_npz())}


# --- payloads --------------------------------------------------------------------------------

class _RunsShell:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch '{self.marker}'",))


class _OpensFile:
    """Unpickling this creates ``marker`` with builtins.open."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (builtins.open, (str(self.marker), "w"))


def pickled_checkpoint(payload: object) -> bytes:
    import torch

    buf = io.BytesIO()
    state = {k: torch.from_numpy(v) for k, v in weights(1).items()}
    torch.save({"state_dict": state, "meta": payload}, buf)
    return buf.getvalue()


def mlp_module():  # noqa: ANN201 (torch.nn.Module; torch is imported lazily)
    """The corpus's MLP as a torch module (fc1: 64 -> 16, fc2: 16 -> 10 on 1x8x8 images): its
    state-dict names are the ONNX model's initializer names."""
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(64, 16)
            self.fc2 = torch.nn.Linear(16, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    return Mlp()


def torchscript_archive() -> bytes:
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save is deprecated; still what attackers send
        torch.jit.save(torch.jit.script(mlp_module()), buf)
    return buf.getvalue()


def onnx_with_external(location: str) -> bytes:
    from onnx.external_data_helper import set_external_data

    m = model_onnx()
    t = m.graph.initializer[0]
    set_external_data(t, location=location, offset=0, length=len(t.raw_data) or 4096)
    t.ClearField("raw_data")
    return m.SerializeToString()


def _zip_with_symlink(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in checkpoints(1).items():
            z.writestr(n, data)
        info = zipfile.ZipInfo(name)
        info.create_system = 3  # Unix, so the mode bits below are read as such
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, target)
    return buf.getvalue()


def _zip_raw_names(members: dict[str, bytes]) -> bytes:
    """A zip with member names exactly as given (ZipFile.writestr keeps them; extractors
    would join them to the target directory)."""
    return history_zip({**checkpoints(1), **members})


# --- the corpus ------------------------------------------------------------------------------

def build(tmp: Path, *, max_upload_bytes: int, max_uncompressed: int) -> list[Case]:
    """Every case, its files built under ``tmp`` where they need files."""
    tmp.mkdir(parents=True, exist_ok=True)
    ok = valid_files()
    cases: list[Case] = []

    def case(name: str, replace: dict[str, tuple[str, bytes]], **kw) -> None:  # noqa: ANN003
        files = {**ok, **replace}
        cases.append(Case(name=name, files={k: v for k, v in files.items() if v is not None},
                          **kw))

    # Pickled code in a .pt checkpoint: os.system and builtins.open payloads.
    m_sys, m_open = tmp / "pwned-os-system", tmp / "pwned-builtins-open"
    case("pickle os.system in .pt", {"history": ("history.zip", history_zip(
        {"epoch_1.pt": pickled_checkpoint(_RunsShell(m_sys))}))},
        code="unsafe_checkpoint", words=("epoch_1.pt", "pickle"), deep=True,
        must_not_exist=(m_sys,))
    case("pickle builtins.open in .pth", {"history": ("history.zip", history_zip(
        {"epoch_1.pth": pickled_checkpoint(_OpensFile(m_open))}))},
        code="unsafe_checkpoint", words=("epoch_1.pth", "pickle"), deep=True,
        must_not_exist=(m_open,))
    # TorchScript: as a checkpoint and as the model.
    ts = torchscript_archive()
    case("TorchScript checkpoint", {"history": ("history.zip", history_zip({"epoch_1.pt": ts}))},
         code="unsafe_checkpoint", words=("epoch_1.pt", "TorchScript"), deep=True)
    case("TorchScript model", {"model": ("model.pt2", ts)}, code="unsafe_model",
         words=("model.pt2", "TorchScript"))
    # Hostile .pt2 archives (hostile_pt2.VARIANTS: pickles torch.export.load would run, the
    # legacy layouts, sympy expressions, ...), each as the model and as a history checkpoint.
    from . import hostile_pt2

    for vname, v in hostile_pt2.VARIANTS.items():
        mark = hostile_pt2.marker_for(tmp, vname, "model")
        case(f"pt2 {vname}, as the model", {"model": ("model.pt2", v.build(mark))},
             code="unsafe_model", words=("model.pt2", *v.words), deep=True,
             must_not_exist=(mark,))
        mark = hostile_pt2.marker_for(tmp, vname, "checkpoint")
        case(f"pt2 {vname}, as a checkpoint", {"history": ("history.zip", history_zip(
            {**checkpoints(1), "epoch_2.pt2": v.build(mark)}))}, code="unsafe_checkpoint",
            words=("epoch_2.pt2", *v.words), deep=True, must_not_exist=(mark,))
    # ONNX external data pointing outside, absolutely, and at a symlink.
    (tmp / "link.bin").unlink(missing_ok=True)
    (tmp / "link.bin").symlink_to("/etc/passwd")  # what the sender's file was; never followed
    case("ONNX external data ../", {"model": ("model.onnx", onnx_with_external("../x.bin"))},
         code="unsafe_model", words=("'../x.bin'", "fc1.weight"))
    case("ONNX external data absolute", {"model": ("model.onnx",
                                                   onnx_with_external("/etc/passwd"))},
         code="unsafe_model", words=("'/etc/passwd'",))
    case("ONNX external data symlink", {"model": ("model.onnx", onnx_with_external("link.bin"))},
         code="unsupported_model", words=("'link.bin'", "external"))
    # Zip slip, absolute member, symlink member (history), and a slip inside a .pt2 model.
    case("zip slip ../../evil", {"history": ("history.zip", _zip_raw_names(
        {"../../evil.safetensors": b"x"}))}, code="unsafe_archive",
        words=("../../evil.safetensors", "'..'"))
    abs_target = tmp / "abs-evil.safetensors"
    case("zip absolute member", {"history": ("history.zip", _zip_raw_names(
        {str(abs_target): b"x"}))}, code="unsafe_archive", words=("absolute",),
        must_not_exist=(abs_target,))
    case("zip symlink member", {"history": ("history.zip", _zip_with_symlink(
        "epoch_9.safetensors", "/etc/passwd"))}, code="unsafe_archive",
        words=("epoch_9.safetensors", "symbolic link"))
    case("zip slip in a .pt2 model", {"model": ("model.pt2", history_zip(
        {"model/../../evil.json": b"{}"}))}, code="unsafe_archive", words=("evil.json", "'..'"))
    # Zip bombs: one member expanding ~1000x, and a total over the (test's) uncompressed cap.
    case("zip bomb (ratio)", {"history": ("history.zip", history_zip(
        {**checkpoints(1), "epoch_2.safetensors": bytes(4 << 20)}, zipfile.ZIP_DEFLATED))},
        code="zip_bomb", words=("epoch_2.safetensors", "expands"))
    noise = np.random.default_rng(2).bytes(max_uncompressed // 2 + 1)  # incompressible
    case("zip bomb (total size)", {"history": ("history.zip", history_zip(
        {"epoch_1.safetensors": noise, "epoch_2.safetensors": noise,
         "epoch_3.safetensors": noise}))}, code="zip_bomb", words=(str(max_uncompressed),))
    # NaN in a checkpoint, Inf in the model's own weights (test_hostile runs all four
    # combinations against the engine in-process; each case here costs a torch import).
    w = weights(2)
    w["fc2.weight"][3, 4] = np.nan
    case("NaN in a checkpoint", {"history": ("history.zip", history_zip(
        {**checkpoints(1), "epoch_2.safetensors": st_save(w)}))},
        code="history_mismatch", words=("epoch_2.safetensors", "fc2.weight", "NaN or infinite"),
        deep=True)
    w = weights(0)
    w["fc1.bias"][0] = -np.inf
    case("Inf in the model", {"model": ("model.onnx", model_onnx(w).SerializeToString())},
         code="model_not_finite", words=("fc1.bias", "NaN or infinite"), deep=True)
    # History from another architecture; labels the model cannot output; channels; empty split.
    w = weights(2)
    w["fc1.weight"] = np.zeros((32, 64), np.float32)
    case("history with mismatched shapes", {"history": ("history.zip", history_zip(
        {**checkpoints(1), "epoch_2.safetensors": st_save(w)}))}, code="history_mismatch",
        words=("epoch_2.safetensors", "fc1.weight", "(32, 64)", "(16, 64)"), deep=True)
    case("labels outside the model's classes", {"data": ("data.npz", data_npz(max_label=12))},
         code="data_model_mismatch", words=("label 12", "10 outputs"), deep=True)
    case("wrong number of input channels", {"data": ("data.npz", data_npz(channels=3))},
         code="data_model_mismatch", words=("3-channel", "1 channel"), deep=True)
    case("empty split", {"data": ("data.npz", data_npz(empty="val"))},
         code="data_empty_split", words=("val", "empty"), deep=True)
    # A config value of the wrong type.
    case("config value of the wrong type", {}, fields={"config": '{"q": "high"}'},
         code="invalid_config", words=("'q'",))
    # Over the size limit, with Content-Length (the without case is sent chunked by the test).
    case("upload over the size limit", {"data": ("data.npz", bytes(max_upload_bytes + 1))},
         status=413, code="upload_too_large", words=("data", str(max_upload_bytes)))
    return cases
