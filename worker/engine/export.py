"""Write the hardened model: safetensors (canonical names), ONNX (checked in onnxruntime) and,
for ``.pt2`` input, a new torch.export archive.

How exporting behaves in torch 2.14 (checked when this was written):

- ``torch.onnx.export`` defaults to the dynamo exporter (``dynamo=True``, needs onnxscript). It
  only implements opset >= 18: asked for 17 it builds 18 and down-converts with the ONNX C API
  (it warns, and the result is opset 17 for the ops our models use). With ``optimize=True`` (the
  default) it folds BatchNorm into the preceding Conv *and keeps the Conv initializer's name*,
  so names no longer mean what they say; with ``optimize=False`` names and BN survive, but the
  graph carries Shape/Squeeze/CastLike nodes that onnx2torch cannot convert back. It takes
  about 2-3 s for a small CNN.
- The legacy TorchScript exporter (``dynamo=False``) still exists (deprecated, "will be
  removed"). With ``do_constant_folding=False`` and ``training=TrainingMode.PRESERVE`` on a
  module in eval mode it writes plain opset-17 Conv/BatchNormalization/Gemm nodes whose
  initializers carry the state-dict names, and onnx2torch converts the file back exactly; it
  takes about 0.1 s. It stores equal-valued parameters once and routes the other names through
  ``Identity`` nodes (``modelio.normalize_onnx`` splits them again).
- The legacy exporter cannot trace a GraphModule from ``ExportedProgram.module()`` ("JIT
  Tracing of SymInts isn't supported", from its input-check hooks). A hook-free copy of the
  same graph (``fx.GraphModule(gm, gm.graph)``) traces, but bakes the example's batch size into
  view/reshape nodes when the graph computes shapes (``x.view(x.size(0), -1)``); the
  onnxruntime check on another batch size catches that. The dynamo exporter handles those
  graphs, but its Reshape carries ``allowzero=1``, which onnx2torch cannot read back.

So ``export_onnx`` tries, in order: the legacy exporter, the dynamo exporter with
``optimize=False``, the dynamo exporter with its optimiser, and keeps the first file that is
opset 17 and matches PyTorch in onnxruntime. The reference subjects and ``.pt2`` models that
flatten with ``torch.flatten`` get the legacy file (re-uploadable, names kept). ONNX input needs
no exporter at all: its own graph is kept and only the initializers are replaced.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .modelio import LoadedModel, normalize_onnx, read_onnx

ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
log = logging.getLogger(__name__)


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1 << 20)


def export_pt2(module: nn.Module, example_x: torch.Tensor, path) -> torch.export.ExportedProgram:
    """``torch.export`` ``module`` (eval semantics) with a dynamic batch and save it to ``path``.

    ``example_x`` needs a batch of at least 2: a batch of 1 lets the tracer specialise it.
    """
    if example_x.shape[0] < 2:
        example_x = example_x.expand(2, *example_x.shape[1:]).clone()
    module.eval()
    ep = torch.export.export(module, (example_x,), dynamic_shapes=({0: _batch_dim()},))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))
    return ep


@contextlib.contextmanager
def _quiet():
    # The exporters print progress to stdout and warn about deprecation and opset conversion.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prev = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(prev)


def export_onnx(module: nn.Module | torch.export.ExportedProgram, example_x: torch.Tensor,
                path, opset: int = ONNX_OPSET) -> Path:
    """Export to ONNX at ``opset`` with a dynamic batch; input ``input``, output ``logits``.

    ``module``: a plain ``nn.Module``, an ``ExportedProgram`` or a GraphModule from
    ``ExportedProgram.module()``. Tries, in order, the legacy exporter (names and BatchNorm
    kept), the dynamo exporter without and with its optimiser; the first file that has the
    requested opset and matches the module in onnxruntime on a batch of 3 (not the example's
    batch size, so a baked-in batch shows) wins. RuntimeError if none does.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if example_x.shape[0] < 2:
        example_x = example_x.expand(2, *example_x.shape[1:]).clone()
    example_x = example_x[:2].detach().cpu().float()
    if isinstance(module, torch.export.ExportedProgram):
        module = _plain(module.module(check_guards=False))
    elif isinstance(module, fx.GraphModule) and _is_export_gm(module):
        module = _plain(module)
    module.eval()
    probe = torch.rand((3, *example_x.shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(probe)
    failures = []
    for strategy in ("legacy", "dynamo", "dynamo_optimized"):
        try:
            with _quiet():
                if strategy == "legacy":
                    torch.onnx.export(
                        module, (example_x,), str(path), dynamo=False, opset_version=opset,
                        do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                        input_names=["input"], output_names=["logits"],
                        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
                    onnx.save(normalize_onnx(onnx.load(str(path))), str(path))
                else:
                    ep = torch.export.export(module, (example_x,),
                                             dynamic_shapes=({0: _batch_dim()},))
                    torch.onnx.export(ep, (example_x,), str(path), dynamo=True,
                                      opset_version=opset, external_data=False,
                                      optimize=(strategy == "dynamo_optimized"),
                                      input_names=["input"], output_names=["logits"])
                proto = onnx.load(str(path))
                if _opset(proto) != opset:
                    from onnx import version_converter

                    proto = version_converter.convert_version(proto, opset)
                    onnx.save(proto, str(path))
            diff = float(np.abs(onnx_logits(path, probe) - want.numpy()).max())
            if diff <= ONNX_TOLERANCE:
                return path
            failures.append(f"{strategy}: logits differ by {diff:.3g}")
        except Exception as e:  # noqa: BLE001 - each exporter fails in its own ways
            failures.append(f"{strategy}: {type(e).__name__}: {str(e)[:200]}")
        log.info("ONNX export strategy %s failed: %s", strategy, failures[-1])
    raise RuntimeError("could not export an ONNX model at opset %d: %s" % (opset, "; ".join(failures)))


def _plain(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph and weights without torch.export's hooks (input-shape checks that the
    legacy exporter's JIT tracer chokes on: "JIT Tracing of SymInts isn't supported")."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _opset(proto) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _is_export_gm(gm: fx.GraphModule) -> bool:
    # ExportedProgram.module() graphs call ATen overloads; onnx2torch graphs call modules.
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               for n in gm.graph.nodes)


def onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    """Run an ONNX file in onnxruntime (CPU, one thread) on ``x``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0]


def write_hardened(model: LoadedModel, hardened_gm_state: dict, out_dir, x_check: torch.Tensor
                   ) -> dict[str, Path]:
    """Write ``hardened.safetensors``, ``hardened.onnx`` and (pt2 input) ``hardened.pt2``.

    ``hardened_gm_state``: the tuned GM's state dict (GM names; buffers optional: missing ones
    keep the original values, every parameter must be present). ``x_check``: (N, C, H, W) test
    inputs; ``hardened.onnx`` in onnxruntime must match the PyTorch logits on them within
    ``ONNX_TOLERANCE`` (max abs), else RuntimeError with the difference.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gm = copy.deepcopy(model.gm).cpu()  # exports and the onnxruntime check run on the CPU
    params = {k for k, _ in gm.named_parameters()}
    missing = sorted(params - set(hardened_gm_state))
    if missing:
        raise ValueError(f"hardened state lacks the parameter(s) {missing[:5]}")
    unknown = sorted(set(hardened_gm_state) - set(gm.state_dict()))
    if unknown:
        raise ValueError(f"hardened state has keys the model does not: {unknown[:5]}")
    gm.load_state_dict({k: v.detach().cpu() for k, v in hardened_gm_state.items()}, strict=False)
    gm.eval()
    x_check = x_check.detach().cpu().float()
    with torch.no_grad():
        ref = gm(x_check)
    if isinstance(ref, (tuple, list)):
        ref = ref[0]

    canonical = model.canonical_state(gm.state_dict())
    out: dict[str, Path] = {}
    p = out_dir / "hardened.safetensors"
    save_file({k: v.contiguous() for k, v in canonical.items()}, str(p),
              metadata={"format": model.fmt, "source": model.path.name})
    out["hardened.safetensors"] = p

    p = out_dir / "hardened.onnx"
    if model.fmt == "onnx":
        _replace_initializers(model.path, canonical, p)
    else:
        p2 = out_dir / "hardened.pt2"
        ep = export_pt2(gm, x_check[:2], p2)
        reloaded = torch.export.load(str(p2)).module(check_guards=False)
        with torch.no_grad():
            d = float((reloaded(x_check) - ref).abs().max())
        if d > 1e-5:
            raise RuntimeError(f"hardened.pt2 logits differ from the PyTorch model's by {d:.3g}")
        out["hardened.pt2"] = p2
        export_onnx(ep, x_check[:2], p)
    out["hardened.onnx"] = p

    diff = float(np.abs(onnx_logits(p, x_check) - ref.numpy()).max())
    if not diff <= ONNX_TOLERANCE:
        raise RuntimeError(
            f"hardened.onnx disagrees with the PyTorch model: max |logit difference| = {diff:.3g} "
            f"on {len(x_check)} inputs (tolerance {ONNX_TOLERANCE})")
    return out


def _replace_initializers(src: Path, canonical: dict[str, torch.Tensor], dst: Path) -> None:
    """The original ONNX graph, byte for byte except the initializers named in ``canonical``."""
    import onnx
    from onnx import numpy_helper

    # The graph as loaded: deduplicated initializers split back into one per parameter, so that
    # each tuned tensor has its own initializer (see modelio.normalize_onnx).
    proto = normalize_onnx(read_onnx(src))
    for init in proto.graph.initializer:
        if init.name not in canonical:
            continue
        old = numpy_helper.to_array(init)
        new = canonical[init.name].detach().cpu().numpy()
        if tuple(new.shape) != tuple(old.shape):
            raise ValueError(f"initializer {init.name!r}: shape {new.shape} != {old.shape}")
        init.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), init.name))
    onnx.save(proto, str(dst))
