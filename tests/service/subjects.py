"""Small, valid-looking inputs for the API: they pass the API's cheap checks (the engine's
validate stage would look deeper)."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx() -> bytes:
    """x (N,1,8,8) -> Flatten -> Gemm(64->10): a valid ONNX classifier onnxruntime can run."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(10, 64)).astype(np.float32), "fc.weight")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def history_zip(n: int = 3) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for e in range(1, n + 1):
            z.writestr(f"epoch_{e:02d}.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return buf.getvalue()


def data_npz(keys=("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")) -> bytes:
    buf = io.BytesIO()
    arrays = {k: (np.zeros((4, 1, 8, 8), np.float32) if k.startswith("x") else np.zeros(4, np.int64))
              for k in keys}
    np.savez(buf, **arrays)
    return buf.getvalue()
