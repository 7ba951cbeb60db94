"""Load the user's classifier (``.pt2`` or ``.onnx``) as a torch.fx GraphModule.

Two naming schemes meet here. The *canonical* names are the ones the user's files use: the
state-dict names of a ``torch.export`` program, the initializer names of an ONNX graph. History
checkpoints and the exported ``hardened.safetensors`` use them. The *GM* names are the keys of
``gm.state_dict()``, which graph analysis and tuning see. ``LoadedModel.name_map`` relates the two,
and ``transposed`` lists the tensors whose GM layout is the transpose of the canonical one.

What we found about torch 2.14 (checked when this was written):

- ``torch.export.load(f).module()`` returns a GraphModule whose weights are ``nn.Parameter``
  with ``requires_grad=True`` and can be trained with any optimizer. The graph is the one traced
  at export time: a model exported in eval mode computes BatchNorm with running statistics and
  dropout as identity whatever ``.training`` says, so "eval semantics" is baked in.
- ``ExportedProgram.module()`` patches ``train()``/``eval()`` on the instance to raise
  ``NotImplementedError``. Because the graph does not depend on the flag, we remove the patch so
  that ``gm.eval()``/``gm.train()`` work like on any module (they only flip the flags).
- ``module(check_guards=True)`` (the default) inserts a ``_guards_fn`` call_module node into the
  graph; ``check_guards=False`` keeps the graph clean and still checks input shapes in a forward
  pre-hook. An archive exported with a static batch size refuses any other batch size (and has
  that size baked into view/reshape nodes), so such archives are refused here.
- ``onnx2torch.convert`` returns its module in training mode; we switch it to eval. Its BatchNorm
  and Dropout modules *do* follow ``.training``: keep the GM in eval mode while tuning, or the
  running statistics move.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from .errors import InputError

MAX_ONNX_OPSET = 17
_ONNX_HINT = ("export with torch.onnx.export(model, x, path, opset_version=17, dynamo=False) "
              "or convert the file with onnx.version_converter to opset 17")
_PT2_HINT = ("export with torch.export.export(model.eval(), (x,), dynamic_shapes="
             "({0: torch.export.Dim('batch')},)) and save with torch.export.save(ep, 'model.pt2')")


@dataclass
class LoadedModel:
    gm: fx.GraphModule          # eval mode; returns logits (N, K); parameters are nn.Parameter
    fmt: str                    # "pt2" | "onnx"
    path: Path
    input_shape: tuple[int, ...]  # (C, H, W)
    num_outputs: int
    # canonical name -> gm.state_dict() key. pt2: every state-dict entry (buffers included).
    # onnx: every initializer the GM holds: weights absorbed into nn.Conv2d/Linear/BatchNorm
    # (parameters, running statistics) and other initializers kept as buffers
    # ("initializers.onnx_initializer_<k>", e.g. Reshape shapes).
    name_map: dict[str, str]
    transposed: set[str] = field(default_factory=set)  # canonical names stored transposed in gm

    @property
    def param_names(self) -> list[str]:
        """Canonical names of the GM's parameters (every checkpoint must carry these)."""
        params = dict(self.gm.named_parameters())
        return [c for c, k in self.name_map.items() if k in params]

    @property
    def canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape in canonical layout."""
        sd = self.gm.state_dict()
        return {c: tuple(sd[k].t().shape if c in self.transposed else sd[k].shape)
                for c, k in self.name_map.items()}

    def canonical_state(self, gm_state: dict) -> dict[str, torch.Tensor]:
        """GM state dict -> canonical names and layout (detached, contiguous copies)."""
        out = {}
        for c, k in self.name_map.items():
            if k in gm_state:
                t = gm_state[k].detach()
                out[c] = (t.t() if c in self.transposed else t).contiguous().clone()
        return out

    def gm_state(self, canonical: dict) -> dict[str, torch.Tensor]:
        """Canonical names and layout -> GM state-dict keys and layout (for load_state_dict)."""
        out = {}
        for c, k in self.name_map.items():
            if c in canonical:
                t = canonical[c].detach()
                out[k] = (t.t() if c in self.transposed else t).contiguous().clone()
        return out


def load_model(path) -> LoadedModel:
    """Load ``path`` (``.pt2`` or ``.onnx``) and check that it maps (N, C, H, W) to (N, K) logits."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".pt2":
        lm = _load_pt2(path)
    elif ext == ".onnx":
        lm = _load_onnx(path)
    else:
        raise InputError(
            "unsupported_model_format",
            f"model file '{path.name}' has the extension {ext or '(none)'!r}; "
            "DARE reads .onnx and .pt2 (torch.export) models",
            "send an ONNX file (opset <= 17) or a torch.export archive (.pt2)",
        )
    for p in lm.gm.parameters():
        p.requires_grad_(True)
    lm.gm.eval()
    check_finite_weights(lm)
    lm.num_outputs = _probe_outputs(lm)
    return lm


def check_finite_weights(lm: LoadedModel) -> None:
    """Refuse NaN/Inf in the model's own weights: every stage would turn them into NaN logits,
    and the job would fail hours later with a meaningless error."""
    canonical = {k: c for c, k in lm.name_map.items()}
    _refuse_non_finite(((canonical.get(k, k), t) for k, t in lm.gm.state_dict().items()),
                       lm.path.name)


def _refuse_non_finite(named, fname: str) -> None:  # noqa: ANN001 (name, tensor) pairs
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(
                "model_not_finite",
                f"model '{fname}': tensor '{name}' holds {bad} NaN or infinite value(s)",
                "export the model from a checkpoint taken before training diverged",
            )


def _probe_outputs(lm: LoadedModel) -> int:
    # Batch 3: unlikely to be a size a static export baked in, so a static batch shows up here.
    x = torch.zeros((3, *lm.input_shape))
    try:
        with torch.no_grad():
            y = lm.gm(x)
    except Exception as e:  # noqa: BLE001 - any failure means the model is unusable as sent
        raise InputError(
            "model_failed",
            f"model '{lm.path.name}' failed on a batch of 3 inputs of shape {lm.input_shape}: "
            f"{type(e).__name__}: {str(e)[:300]}",
            "the model must accept any batch size (a dynamic batch dimension)",
        ) from None
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 3:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(
            "bad_model_output",
            f"model '{lm.path.name}' returns {shape} for a batch of 3; a classifier must return "
            "one tensor of logits (N, K)",
            "return the logits of the last layer (no softmax needed, no extra outputs)",
        )
    return int(y.shape[1])


def _check_chw(dims, name: str, where: str) -> tuple[int, int, int]:
    if len(dims) != 4:
        raise InputError(
            "unsupported_input_shape",
            f"model '{name}' takes input of rank {len(dims)} ({where}); DARE needs images "
            "(N, C, H, W)",
            "put any flattening inside the model so that it takes (N, C, H, W)",
        )
    chw = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in chw):
        raise InputError(
            "dynamic_input_shape",
            f"model '{name}' has a non-static image shape {tuple(str(d) for d in chw)} ({where})",
            "only the batch dimension may be dynamic; export with a fixed C, H and W",
        )
    return tuple(int(d) for d in chw)  # type: ignore[return-value]


# --------------------------------------------------------------------------- torch.export


def check_pt2_archive(src, name: str) -> None:
    """Refuse a ``.pt2`` archive whose loading could run code, before ``torch.export.load``.

    ``torch.export.load`` is not safe on untrusted files in torch 2.14 (see
    :mod:`worker.engine.pt2_layout` for the ways it runs code). Two layers, each enough for
    pickles on its own: ``worker.engine`` forces ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, so every
    ``torch.load`` torch makes refuses a pickle that needs code; and the archive must be exactly
    the layout ``torch.export.save`` writes (:func:`worker.engine.pt2_layout.check_layout`), whose
    one pickle, the sample inputs, is loaded here with ``weights_only=True`` first.
    ``src``: a path or the archive's bytes; ``name``: how messages name it ("model 'm.pt2'").
    """
    import pickle
    import zipfile

    try:
        zf = zipfile.ZipFile(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError("corrupt_model",
                         f"{name} is not a readable torch.export archive (not a zip: {e})",
                         _PT2_HINT) from None

    with zf:
        from .archive_safety import CAPS, check_members, is_torchscript
        from .pt2_layout import SAMPLE_INPUTS, check_layout

        check_members(zf, name, max_total=CAPS.max_total, max_ratio=CAPS.max_ratio, hint=_PT2_HINT)
        names = zf.namelist()
        if is_torchscript(names):
            raise InputError(
                "unsafe_model",
                f"{name} cannot be loaded safely: its member '{names[0].split('/')[0]}/code/' "
                "holds TorchScript code: this is a torch.jit.save archive, whose loading runs "
                "the code it carries",
                "save a plain torch.export program of tensors only: " + _PT2_HINT)
        member = f"{check_layout(zf, name, _PT2_HINT)}/{SAMPLE_INPUTS}"
        try:
            torch.load(io.BytesIO(zf.read(member)), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, or anything a bad file raises
            why = (f"is a pickle that needs code to load ({_unpickler_reason(e)})"
                   if isinstance(e, pickle.UnpicklingError)
                   else f"is not a plain tensor file ({type(e).__name__})")
            raise InputError(
                "unsafe_model", f"{name} cannot be loaded safely: its member '{member}' {why}",
                "save a plain torch.export program of tensors only: " + _PT2_HINT) from None


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that names the global, not its long advice."""
    import re

    m = re.search(r"(?:WeightsUnpickler error: |\n)([^\n]*(?:GLOBAL|global)[^\n]*)", str(e))
    return (m.group(1) if m else str(e).splitlines()[0]).strip().split(" Please")[0][:200]


def _load_pt2(path: Path) -> LoadedModel:
    check_pt2_archive(path, f"model '{path.name}'")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        raise InputError(
            "corrupt_model",
            f"model '{path.name}' is not a readable torch.export archive: "
            f"{type(e).__name__}: {str(e)[:300]}",
            _PT2_HINT,
        ) from None
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise InputError(
            "unsupported_model",
            f"model '{path.name}' takes {len(user_inputs)} inputs; DARE needs exactly one "
            "image batch",
            _PT2_HINT,
        )
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise InputError("unsupported_model",
                         f"model '{path.name}': its input is not a tensor", _PT2_HINT)
    # Static sizes are ints; dynamic ones are SymInts (e.g. "s31").
    dims = [d if isinstance(d, int) else str(d) for d in val.shape]
    input_shape = _check_chw(dims, path.name, "from the archive's input spec")
    if isinstance(dims[0], int):
        raise InputError(
            "static_batch",
            f"model '{path.name}' was exported for batches of exactly {int(val.shape[0])}",
            _PT2_HINT,
        )
    gm = ep.module(check_guards=False)
    # ExportedProgram.module() makes train()/eval() raise; the traced graph ignores the flag
    # anyway (see the module docstring), so restore the ordinary nn.Module methods.
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    name_map = {k: k for k in gm.state_dict()}
    return LoadedModel(gm=gm, fmt="pt2", path=path, input_shape=input_shape, num_outputs=0,
                       name_map=name_map, transposed=set())


# --------------------------------------------------------------------------- ONNX


def read_onnx(path: Path):
    """Parse an ONNX file (weights included) or raise InputError naming it."""
    import onnx

    try:
        # External data would make onnx read files named inside the upload; refused below.
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InputError(
            "corrupt_model",
            f"model '{path.name}' is not a readable ONNX file: {type(e).__name__}: {str(e)[:300]}",
            _ONNX_HINT,
        ) from None
    check_no_external_data(proto, f"model '{path.name}'")
    if not proto.graph.node:
        raise InputError("corrupt_model", f"model '{path.name}' has an empty ONNX graph",
                         _ONNX_HINT)
    return proto


def check_no_external_data(proto, name: str) -> None:
    """Refuse ONNX tensors stored in side files: the upload is one self-contained file, and
    following its paths would read files of the server."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for t in _get_all_tensors(proto):  # initializers and tensors inside node attributes
        if uses_external_data(t):
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            raise InputError(
                "unsupported_model",
                f"{name} keeps the tensor '{t.name}' in the external data file {location!r}; "
                "external data is never read (it would open files on the server)",
                "send one self-contained .onnx file (onnx.save(model, path, "
                "save_as_external_data=False); models must be under 2 GB)",
            )


def normalize_onnx(proto):
    """Undo the legacy exporter's initializer deduplication, in place; returns ``proto``.

    ``torch.onnx.export(dynamo=False)`` stores equal-valued parameters once and feeds the other
    names through ``Identity`` nodes (two BatchNorm biases that meet in a residual addition get
    equal gradients and stay equal, so this happens to ordinary ResNets). onnx2torch then cannot
    absorb the weights into an ``nn.BatchNorm2d``/``nn.Conv2d``, and tuning one name would change
    both. Each such ``Identity`` becomes an initializer of its own under its output name, which is
    the parameter's state-dict name.
    """
    import onnx

    inits = {i.name: i for i in proto.graph.initializer}
    graph_outputs = {o.name for o in proto.graph.output}
    changed = True
    while changed:
        changed = False
        for node in list(proto.graph.node):
            if (node.op_type == "Identity" and node.domain in ("", "ai.onnx")
                    and len(node.input) == 1 and node.input[0] in inits
                    and node.output[0] not in inits and node.output[0] not in graph_outputs):
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[node.input[0]])
                copy.name = node.output[0]
                proto.graph.initializer.append(copy)
                inits[copy.name] = proto.graph.initializer[-1]
                proto.graph.node.remove(node)
                changed = True
    return proto


def onnx_opset(proto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _check_onnx_ops(proto, name: str) -> None:
    """Refuse what onnx2torch cannot convert before converting, naming the op."""
    from onnx2torch.node_converters.registry import get_converter

    opset = onnx_opset(proto)
    if opset > MAX_ONNX_OPSET:
        raise InputError(
            "unsupported_opset",
            f"model '{name}' uses ONNX opset {opset}; DARE converts ONNX models up to opset "
            f"{MAX_ONNX_OPSET}",
            _ONNX_HINT,
        )
    versions = {o.domain or "": int(o.version) for o in proto.opset_import}
    for node in proto.graph.node:
        domain = node.domain if node.domain not in ("ai.onnx",) else ""
        where = f"node '{node.name}'" if node.name else "a node"
        if domain not in versions:
            raise InputError(
                "unsupported_op",
                f"model '{name}' uses the operation {node.op_type!r} of the unknown domain "
                f"{domain!r} ({where})",
                _ONNX_HINT,
            )
        try:
            get_converter(domain=domain, operation_type=node.op_type, version=versions[domain])
        except NotImplementedError:
            dom = f"{domain}::" if domain else ""
            raise InputError(
                "unsupported_op",
                f"model '{name}' uses the ONNX operation {dom}{node.op_type} ({where}, opset "
                f"{versions[domain]}), which the ONNX-to-PyTorch converter cannot convert",
                _ONNX_HINT + "; if the op remains, replace it in the model (custom and "
                "contrib-domain ops are not supported)",
            ) from None


def _load_onnx(path: Path) -> LoadedModel:
    import onnx2torch

    proto = normalize_onnx(read_onnx(path))
    _check_onnx_ops(proto, path.name)
    init_names = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise InputError(
            "unsupported_model",
            f"model '{path.name}' has {len(inputs)} graph inputs; DARE needs exactly one image "
            "batch",
            _ONNX_HINT,
        )
    tt = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tt.shape.dim]
    input_shape = _check_chw(dims, path.name, f"graph input '{inputs[0].name}'")
    try:
        gm = onnx2torch.convert(proto, attach_onnx_mapping=True)
    except NotImplementedError as e:
        raise InputError(
            "unsupported_op",
            f"model '{path.name}' could not be converted to PyTorch: {str(e)[:300]}",
            _ONNX_HINT,
        ) from None
    except Exception as e:  # noqa: BLE001 - shape inference and converters raise anything
        raise InputError(
            "corrupt_model",
            f"model '{path.name}' could not be converted to PyTorch: "
            f"{type(e).__name__}: {str(e)[:300]}",
            _ONNX_HINT,
        ) from None
    gm.eval()
    # Before the name mapping, which matches tensors by value (and NaN equals nothing).
    _refuse_non_finite(onnx_initializers(proto).items(), path.name)
    name_map, transposed = _onnx_name_map(proto, gm, path.name)
    return LoadedModel(gm=gm, fmt="onnx", path=path, input_shape=input_shape, num_outputs=0,
                       name_map=name_map, transposed=transposed)


# Which input slot of an ONNX node becomes which tensor of the module onnx2torch builds for it.
_ABSORBED = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "Gemm": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
    "LayerNormalization": {1: "weight", 2: "bias"},
}


def onnx_initializers(proto) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer}


def _onnx_name_map(proto, gm: fx.GraphModule, fname: str) -> tuple[dict[str, str], set[str]]:
    """Relate ONNX initializer names to GM state-dict keys; every pair is checked by value.

    onnx2torch names a node's module after the node (dots become slashes) and absorbs the
    weights of Conv/Gemm/BatchNormalization/... into that module (``_ABSORBED``). A Gemm with
    transB=0 becomes an nn.Linear holding the transposed matrix. Initializers that a module
    does not absorb become buffers ``initializers.onnx_initializer_<k>``, wired to the node as
    ``get_attr`` arguments in the order of the node's ``onnx_mapping.inputs``.
    """
    from onnx2torch.onnx_graph import OnnxGraph

    inits = onnx_initializers(proto)
    sd = gm.state_dict()
    name_map: dict[str, str] = {}
    transposed: set[str] = set()
    modules = dict(gm.named_modules())

    def claim(init: str, key: str, transpose: bool) -> None:
        if init not in inits or key not in sd or init in name_map:
            return
        want = inits[init].t() if transpose else inits[init]
        if tuple(want.shape) != tuple(sd[key].shape) or not torch.equal(
                want.to(sd[key].dtype), sd[key]):
            return
        name_map[init] = key
        if transpose:
            transposed.add(init)

    graph = OnnxGraph(proto.graph)
    for mod_name, node in graph.nodes.items():
        slots = _ABSORBED.get(node.operation_type)
        mod = modules.get(mod_name)
        if not slots or mod is None:
            continue
        prefix = mod_name
        if isinstance(mod, torch.nn.Sequential):  # Conv with asymmetric padding: (pad, conv)
            prefix = f"{mod_name}.{len(mod) - 1}"
        attrs = node.attributes
        if node.operation_type == "Gemm" and isinstance(mod, torch.nn.Linear):
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise InputError(
                    "unsupported_op",
                    f"model '{fname}': Gemm node '{node.name}' scales its weights "
                    f"(alpha={attrs.get('alpha', 1.0)}, beta={attrs.get('beta', 1.0)}), so its "
                    "tuned weights could not be written back unchanged",
                    _ONNX_HINT,
                )
        for slot, attr in slots.items():
            if slot < len(node.input_values) and node.input_values[slot]:
                transpose = (node.operation_type == "Gemm" and attr == "weight"
                             and not attrs.get("transB", 0))
                claim(node.input_values[slot], f"{prefix}.{attr}", transpose)

    # Initializers passed to modules as get_attr arguments (MatMul/Add/Mul weights, shapes...).
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mapping = getattr(modules.get(n.target), "onnx_mapping", None)
        if mapping is None:
            continue
        values = [v for v in mapping.inputs if v]
        args = list(n.args) + list(n.kwargs.values())
        for v, a in zip(values, args):
            if isinstance(a, fx.Node) and a.op == "get_attr":
                claim(v, a.target, False)

    params = dict(gm.named_parameters())
    mapped = set(name_map.values())
    unmapped = [k for k in params if k not in mapped]
    if unmapped:
        raise InputError(
            "onnx_mapping",
            f"model '{fname}': the converted parameter {unmapped[0]!r} could not be related to an "
            "ONNX initializer",
            "weights must be graph initializers (not Constant nodes or graph inputs)",
        )
    return name_map, transposed
