"""Graph analysis: which nodes of an fx GraphModule are DARE's layers, and how they connect.

Works on the two graph dialects the loaders produce: ``torch.export`` programs (``call_function``
nodes on ATen ops, weights as ``get_attr`` nodes) and onnx2torch conversions (``call_module``
nodes on ``nn.Conv2d``/``nn.Linear``/... and ``Onnx*`` modules), plus plain ``symbolic_trace``.

Vocabulary (paper section 3.1.1):
- a *layer* is a Conv2d or Linear node; its neurons are its output channels/features;
- a *norm* is a BatchNorm node: parametric, per channel, no synapses; it is tuned with the
  channels it normalises;
- everything else on the data path must be *transparent* (keeps channel identity: activations,
  pooling, flatten/reshape, dropout) or a residual *add*. Anything else is refused by name.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError, UnsupportedOp

_ATEN_LAYER = {"conv2d", "convolution", "linear"}
_ATEN_NORM = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
              "_native_batch_norm_legit", "cudnn_batch_norm"}
_ATEN_TRANSPARENT = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "elu", "elu_", "gelu", "tanh", "sigmoid",
    "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "_adaptive_avg_pool2d", "flatten", "view", "reshape", "_unsafe_view",
    "dropout", "feature_dropout", "alpha_dropout", "native_dropout", "alias", "clone",
    "contiguous", "detach", "mean", "squeeze", "unsqueeze", "_to_copy", "to",
}
_ATEN_ADD = {"add", "add_"}
_ATEN_SHAPE = {"sym_size", "size", "sym_numel"}

_MOD_TRANSPARENT = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity,
)
_MOD_TRANSPARENT_NAMES = {
    "OnnxFlatten", "OnnxReshape", "OnnxGlobalAveragePool", "OnnxGlobalAveragePoolWithKnownInputShape",
    "OnnxCopyIdentity", "OnnxDropoutDynamic", "OnnxSqueezeStaticAxes", "OnnxUnsqueezeStaticAxes",
    "OnnxCast",
}
_MOD_SHAPE_NAMES = {"OnnxShape", "OnnxConstant", "OnnxConstantOfShape"}
_FN_TRANSPARENT = {
    torch.relu, torch.tanh, torch.sigmoid, torch.flatten, torch.reshape,
    nn.functional.relu, nn.functional.leaky_relu, nn.functional.elu, nn.functional.gelu,
    nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d,
    nn.functional.dropout, nn.functional.tanh, nn.functional.sigmoid, torch.squeeze,
    operator.getitem,
}
_METHOD_TRANSPARENT = {"view", "reshape", "flatten", "relu", "contiguous", "squeeze", "mean",
                       "sigmoid", "tanh", "clone", "detach", "to"}
_METHOD_SHAPE = {"size", "dim"}


@dataclass
class Layer:
    """A Conv2d or Linear node, with the state-dict keys of its weight and bias."""

    node: str
    kind: str  # "conv" | "linear"
    weight_key: str
    bias_key: str | None
    index: int = 0


@dataclass
class Norm:
    """A BatchNorm node (tuned per channel together with the channels it normalises)."""

    node: str
    weight_key: str | None
    bias_key: str | None


@dataclass
class GraphInfo:
    gm: fx.GraphModule
    layers: list[Layer]
    norms: list[Norm]
    layer_input: dict[str, str]  # layer node -> the node feeding its data input
    # layer or norm node -> the layers whose outputs reach its data input
    producers: dict[str, list[str]] = field(default_factory=dict)
    output_node: str = ""

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.node == name)

    def cut(self, p: int) -> tuple[int, str]:
        """Where M_T ends: ``(k, node)`` with the first ``k`` layers kept.

        ``node`` is the data input of the first removed layer, i.e. exactly what that layer
        receives (paper 3.1.2: the removed last p layers are skipped back over to the preceding
        parametric layer, so activations, pooling and dropout after layer k stay in M_T).
        """
        r = len(self.layers)
        if not 1 <= p < r:
            raise InputError("invalid_config", f"p={p} must be between 1 and {r - 1} for a model "
                             f"with {r} conv/linear layers", "use the default p=1")
        k = r - p
        node = self.layer_input[self.layers[k].node]
        anc = _ancestors(self.gm.graph, node)
        # M_T must be a prefix of M: every kept layer feeds the cut, no removed layer does.
        if any(layer.node not in anc for layer in self.layers[:k]) or any(
            layer.node in anc for layer in self.layers[k:]
        ):
            raise InputError("invalid_config", f"p={p} cuts the model inside a residual block",
                             "choose a p at which the network has a single path (p=1 usually)")
        return k, node


def _ancestors(graph: fx.Graph, name: str) -> set[str]:
    nodes = {n.name: n for n in graph.nodes}
    seen, stack = set(), [nodes[name]]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a.name not in seen:
                seen.add(a.name)
                stack.append(a)
    return seen


def _aten_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target).split(".")[1]
    return None


def _param_key(gm: fx.GraphModule, node: fx.Node | None) -> str | None:
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    raise UnsupportedOp(f"weight computed by {node.op} {node.target}", node.name if node else "")


def classify(gm: fx.GraphModule, node: fx.Node) -> tuple[str, object | None]:
    """Return ``(kind, detail)`` with kind in layer/norm/transparent/add/shape/const/input/output."""
    if node.op == "placeholder":
        return "input", None
    if node.op == "output":
        return "output", None
    if node.op == "get_attr":
        return "const", None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        tgt = str(node.target)
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise UnsupportedOp(f"grouped Conv2d (groups={mod.groups})", node.name)
            return "layer", Layer(node.name, "conv", tgt + ".weight",
                                  tgt + ".bias" if mod.bias is not None else None)
        if isinstance(mod, nn.Linear):
            return "layer", Layer(node.name, "linear", tgt + ".weight",
                                  tgt + ".bias" if mod.bias is not None else None)
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            return "norm", Norm(node.name, tgt + ".weight" if mod.affine else None,
                                tgt + ".bias" if mod.affine else None)
        name = type(mod).__name__
        if name == "OnnxBatchNorm":  # onnx2torch's form when the initializers are graph inputs
            return "norm", Norm(node.name, _param_key(gm, node.args[1]), _param_key(gm, node.args[2]))
        if isinstance(mod, _MOD_TRANSPARENT) or name in _MOD_TRANSPARENT_NAMES:
            return "transparent", None
        if name in _MOD_SHAPE_NAMES:
            return "shape", None
        if name == "OnnxBinaryMathOperation" and getattr(mod, "math_op_function", None) is torch.add:
            return "add", None
        if name == "_GuardsFn" or tgt == "_guards_fn":
            return "ignore", None
        raise UnsupportedOp(name, node.name)
    if node.op == "call_function":
        aten = _aten_name(node.target)
        if aten is not None:
            if aten in _ATEN_LAYER:
                if aten == "convolution" and node.args[6]:
                    raise UnsupportedOp("transposed convolution", node.name)
                if aten in ("conv2d", "convolution"):
                    groups = node.args[8] if aten == "convolution" else (
                        node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))
                    if groups != 1:
                        raise UnsupportedOp(f"grouped convolution (groups={groups})", node.name)
                bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                return "layer", Layer(node.name, "conv" if aten != "linear" else "linear",
                                      _param_key(gm, node.args[1]), _param_key(gm, bias))
            if aten in _ATEN_NORM:
                return "norm", Norm(node.name, _param_key(gm, node.args[1]),
                                    _param_key(gm, node.args[2]))
            if aten in _ATEN_TRANSPARENT:
                return "transparent", None
            if aten in _ATEN_ADD:
                return "add", None
            if aten in _ATEN_SHAPE:
                return "shape", None
            raise UnsupportedOp(f"aten.{aten}", node.name)
        if node.target in (operator.add, torch.add):
            return "add", None
        if node.target in _FN_TRANSPARENT:
            return "transparent", None
        raise UnsupportedOp(getattr(node.target, "__name__", str(node.target)), node.name)
    if node.op == "call_method":
        if node.target in _METHOD_TRANSPARENT:
            return "transparent", None
        if node.target in _METHOD_SHAPE:
            return "shape", None
        if node.target in ("add", "add_"):
            return "add", None
        raise UnsupportedOp(f"Tensor.{node.target}", node.name)
    raise UnsupportedOp(node.op, node.name)


def analyze(gm: fx.GraphModule) -> GraphInfo:
    """Classify every node on the data path; find the layers, norms and who feeds whom.

    A node is on the data path when its value depends on the model input; shape computations
    and constants are not, so they may use any op.
    """
    data: set[str] = set()
    layers: list[Layer] = []
    norms: list[Norm] = []
    layer_input: dict[str, str] = {}
    kinds: dict[str, str] = {}
    out_node = ""
    for node in gm.graph.nodes:
        ins = [a for a in node.all_input_nodes if a.name in data]
        if node.op == "placeholder":
            data.add(node.name)
            kinds[node.name] = "input"
            continue
        if node.op == "output":
            outs = [a for a in node.all_input_nodes if a.name in data]
            if len(outs) != 1:
                raise UnsupportedOp(f"{len(outs)} model outputs (one logits tensor expected)")
            out_node = outs[0].name
            continue
        if not ins:
            continue  # a constant or a shape computation: not on the data path
        kind, detail = classify(gm, node)
        if kind == "ignore":
            continue
        if kind == "shape":
            continue  # depends on the input's shape only, not its values
        if kind == "const":
            continue
        if kind == "add":
            if len(ins) == 1:
                kind = "transparent"  # adding a constant keeps channel identity
        elif len(ins) != 1:
            raise UnsupportedOp(f"{node.target} with {len(ins)} data inputs", node.name)
        data.add(node.name)
        kinds[node.name] = kind
        if kind == "layer":
            assert isinstance(detail, Layer)
            detail.index = len(layers)
            layers.append(detail)
            layer_input[node.name] = ins[0].name
        elif kind == "norm":
            norms.append(detail)  # type: ignore[arg-type]
    if len(layers) < 2:
        raise InputError("too_few_layers", f"the model has {len(layers)} conv/linear layers",
                         "DARE needs at least two (it removes the last p layers to make M_T)")
    info = GraphInfo(gm, layers, norms, layer_input, output_node=out_node)
    nodes = {n.name: n for n in gm.graph.nodes}
    memo: dict[str, list[str]] = {}

    def producers(name: str) -> list[str]:
        """Layers whose outputs reach ``name`` through transparent ops, norms and adds."""
        if name in memo:
            return memo[name]
        kind = kinds.get(name)
        if kind == "layer":
            res = [name]
        elif kind == "input":
            res = []
        else:
            res = []
            for a in nodes[name].all_input_nodes:
                if a.name in data:
                    res += [p for p in producers(a.name) if p not in res]
        memo[name] = res
        return res

    for layer in layers:
        info.producers[layer.node] = producers(layer_input[layer.node])
    for norm in norms:
        info.producers[norm.node] = [
            p for a in nodes[norm.node].all_input_nodes if a.name in data for p in producers(a.name)]
    if producers(out_node) != [layers[-1].node]:
        raise UnsupportedOp("an output that is not produced by the last conv/linear layer")
    return info


def plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule with the same graph and parameters.

    ``torch.export``'s ``ExportedProgram.module()`` refuses ``.eval()``/``.train()``; its graph is
    already in inference form (batch norm and dropout have ``training=False`` baked in), so a
    plain GraphModule computes the same thing and lets attack code toggle modes safely.
    """
    plain = fx.GraphModule(gm, gm.graph)
    plain.eval()
    return plain


def truncate(gm: fx.GraphModule, node: str) -> fx.GraphModule:
    """M_T: a GraphModule computing ``node`` that shares ``gm``'s parameter objects.

    Sharing (not copying) is what makes sync exact: tuning M_T's parameters tunes the
    corresponding parameters of ``gm`` in place, and the removed layers are never touched.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.name == node:
            graph.output(env[n])
            break
    mt = fx.GraphModule(gm, graph)
    mt.graph.eliminate_dead_code()
    mt.recompile()
    mt.delete_all_unused_submodules()
    mt.eval()
    return mt
