"""Model transformation (paper 3.1.2): M_T and its per-class key-neuron regression loss."""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph import truncate


def build_mt(gm: fx.GraphModule, cut_node: str) -> fx.GraphModule:
    """M_T = M without its last p layers; shares M's parameter objects (see ``graph.truncate``)."""
    return truncate(gm, cut_node)


def key_neuron_loss(out: torch.Tensor, target: torch.Tensor, key_units: torch.Tensor) -> torch.Tensor:
    """Formula 3: mean squared error over the class's key neurons at M_T's output layer.

    out, target: (N, U) or (N, U, H, W) with U neurons (a channel's positions all belong to its
    neuron); key_units: bool (U,) for the class of every sample in the batch (batches are drawn
    one class at a time, so one mask serves the whole batch).
    """
    diff = (out - target).flatten(2) if out.dim() > 2 else (out - target).unsqueeze(2)
    sel = diff[:, key_units]
    if sel.numel() == 0:
        return out.sum() * 0.0  # a class without key neurons has nothing to learn
    return sel.pow(2).mean()
