"""Profiling (NNSlicer's first phase, paper 3.1.1 and formula 1).

The activation of a neuron on one sample is the mean of its activations (for a conv channel:
over all spatial positions). We record it at the input and at the output of every layer, per
class, over the training set; ``delta(c) = mean over class c - mean over the whole set``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .errors import Cancelled
from .graph import GraphInfo


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of the named nodes (others are freed as usual)."""

    def __init__(self, gm: fx.GraphModule, keep: set[str]):
        super().__init__(gm)
        self.keep = keep
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out
        return out


def run_recording(gm: fx.GraphModule, x: torch.Tensor, nodes: set[str]) -> dict[str, torch.Tensor]:
    """Forward ``x`` and return the values of ``nodes`` (used by profiling and oracle mining)."""
    rec = _Recorder(gm, nodes)
    rec.run(x)
    return rec.values


def unit_means(t: torch.Tensor) -> torch.Tensor:
    """(N, U, ...) -> (N, U): one value per neuron (channel or feature) per sample."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


@dataclass
class Profile:
    """Per-layer neuron means: ``inp[layer]``/``out[layer]`` are (K + 1, U); row K is the overall
    mean over the training set, rows 0..K-1 the class means."""

    inp: dict[str, torch.Tensor]
    out: dict[str, torch.Tensor]
    num_classes: int

    def delta_in(self, layer: str, c: int) -> torch.Tensor:
        return self.inp[layer][c] - self.inp[layer][-1]

    def delta_out(self, layer: str, c: int) -> torch.Tensor:
        return self.out[layer][c] - self.out[layer][-1]


@torch.no_grad()
def profile(info: GraphInfo, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
            batch_size: int = 500, device: str = "cpu",
            progress: Callable[[float], None] = lambda f: None,
            cancelled: Callable[[], bool] = lambda: False) -> Profile:
    gm = info.gm
    wanted = {layer.node for layer in info.layers} | set(info.layer_input.values())
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    n = len(x)
    for start in range(0, n, batch_size):
        if cancelled():
            raise Cancelled()
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        vals = run_recording(gm, xb, wanted)
        for name, v in vals.items():
            m = unit_means(v.detach()).double()
            if name not in sums:
                sums[name] = torch.zeros(num_classes, m.shape[1], dtype=torch.float64, device=device)
            sums[name].index_add_(0, yb, m)
        counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
        progress(min(1.0, (start + len(xb)) / n))

    def means(name: str) -> torch.Tensor:
        s = sums[name]
        per_class = s / counts.clamp(min=1).unsqueeze(1)
        overall = s.sum(0, keepdim=True) / counts.sum()
        return torch.cat([per_class, overall]).float().cpu()

    inp = {layer.node: means(info.layer_input[layer.node]) for layer in info.layers}
    out = {layer.node: means(layer.node) for layer in info.layers}
    return Profile(inp, out, num_classes)
