"""NNSlicer's backward analysis (paper 3.1.1, formula 2) and DARE's per-class key synapses.

For class c we start at output neuron c with contribution 1 and walk the layers backwards. For a
layer with weights W (out x in) the synapse h -> n contributes

    contrib[n, h] = CONTRIB_n * dy_n * W[n, h] * dy_h                       (formula 2)

where dy are the profile's deltas (class mean minus overall mean) at the layer's output and
input. One matrix expression per layer; no loop over synapses. Input neurons accumulate the sign
of their contributions (CONTRIB_h += sign(contrib_h)) and hand them to the layers that produce
them. Choices, documented because the paper leaves them open:

- Conv synapses are aggregated per (out channel, in channel) pair: the neuron of a conv layer is a
  channel, so the synapse between two channel-neurons is the whole kernel slice, and W[n, h] is
  its sum. A key pair frees all kh x kw weights of the slice.
- Where a conv output is flattened into a dense layer, a dense input neuron is one (channel,
  position) feature; its accumulated contribution is summed back to its channel.
- Key synapses are ranked per class and per layer by their contribution, among the synapses with
  a non-zero one (most synapses into the last layer belong to other classes and contribute zero,
  so ranking over all of them would keep nearly everything). The top ``q`` are kept, which drops
  the ``1 - q`` most negative ones. The paper ranks by cumulative sign counts; with class-mean
  deltas every synapse is visited once per class, so the count is a sign and the real-valued
  contribution is the tie-breaker that makes "top q" meaningful.
- Key neurons are the neurons key synapses touch, on either side.
- Biases are tuned with their neuron; a BatchNorm channel is tuned when the channel it
  normalises is a key neuron.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import UnsupportedOp
from .graph import GraphInfo, _ancestors
from .profiling import Profile


@dataclass
class SliceResult:
    """Per-class masks over every parameter of M_T's layers and norms.

    ``masks[key]``: bool (K, *param.shape); ``key_units``: bool (K, U) over the units of M_T's
    output (channels if it is 4-D, features if 2-D)."""

    q: float
    k: int  # layers kept in M_T
    cut_node: str
    masks: dict[str, torch.Tensor]
    key_units: torch.Tensor
    stats: dict = field(default_factory=dict)

    def to_state(self) -> dict:
        return {"q": self.q, "k": self.k, "cut_node": self.cut_node, "masks": self.masks,
                "key_units": self.key_units, "stats": self.stats}

    @classmethod
    def from_state(cls, s: dict) -> "SliceResult":
        return cls(s["q"], s["k"], s["cut_node"], s["masks"], s["key_units"], s.get("stats", {}))


def _to_producer(c_in: torch.Tensor, units: int, where: str) -> torch.Tensor:
    """Sum a layer-input vector back onto the ``units`` neurons of the layer that produced it."""
    if c_in.numel() == units:
        return c_in
    if c_in.numel() % units:
        raise UnsupportedOp(f"a reshape that mixes channels ({c_in.numel()} -> {units})", where)
    return c_in.view(units, -1).sum(1)


def _expand(mask: torch.Tensor, units: int) -> torch.Tensor:
    """Inverse of ``_to_producer`` for masks: a channel mask onto the (flattened) units."""
    if mask.numel() == units:
        return mask
    if units % mask.numel():
        raise UnsupportedOp(f"a reshape that mixes channels ({mask.numel()} -> {units})")
    return mask.repeat_interleave(units // mask.numel())


def synapse_weights(w: torch.Tensor) -> torch.Tensor:
    """(out, in[, kh, kw]) -> (out, in): one weight per synapse (conv: summed kernel slice)."""
    return w.flatten(2).sum(2) if w.dim() > 2 else w


def top_fraction(contrib: torch.Tensor, q: float) -> torch.Tensor:
    """Mask of the top ``q`` fraction of the non-zero entries of ``contrib`` (by value)."""
    nz = contrib != 0
    m = int(nz.sum())
    if m == 0:
        return nz
    keep = max(1, math.ceil(q * m))
    vals = contrib[nz]
    thr = torch.kthvalue(vals, m - keep + 1).values
    return nz & (contrib >= thr)


@torch.no_grad()
def slice_model(info: GraphInfo, prof: Profile, q: float, p: int) -> SliceResult:
    gm = info.gm
    state = gm.state_dict()
    layers = info.layers
    k, cut = info.cut(p)
    in_mt = _ancestors(gm.graph, cut) | {cut}
    K = prof.num_classes
    mt_layers = layers[:k]
    mt_norms = [n for n in info.norms if n.node in in_mt]
    w_syn = {L.node: synapse_weights(state[L.weight_key].detach().float().cpu()) for L in layers}
    out_units = {L.node: w_syn[L.node].shape[0] for L in layers}

    # Masks exist for trainable tensors only (a converter may hold batch-norm affine terms as
    # buffers; those stay as they are).
    trainable = {name for name, _ in gm.named_parameters()}
    masks: dict[str, torch.Tensor] = {
        key: torch.zeros((K, *state[key].shape), dtype=torch.bool)
        for unit in (*mt_layers, *mt_norms) for key in (unit.weight_key, unit.bias_key)
        if key in trainable}

    first_removed = layers[k].node
    cut_units = prof.inp[first_removed].shape[1]
    key_units = torch.zeros(K, cut_units, dtype=torch.bool)
    kept = total = 0
    nonzero_frac = []
    for c in range(K):
        contrib_acc = {L.node: torch.zeros(out_units[L.node]) for L in layers}
        contrib_acc[layers[-1].node][c] = 1.0
        key_out: dict[str, torch.Tensor] = {}
        for L in reversed(layers):
            C = contrib_acc[L.node]
            contrib = (C * prof.delta_out(L.node, c)).unsqueeze(1) * w_syn[L.node] \
                * prof.delta_in(L.node, c).unsqueeze(0)
            syn = top_fraction(contrib, q)
            key_out[L.node] = syn.any(1)
            if L.node == first_removed:
                key_units[c] |= syn.any(0)
            if L.index < k:
                w = masks[L.weight_key]
                w[c] = syn.view(*syn.shape, *([1] * (w.dim() - 3))).expand_as(w[c])
                if L.bias_key in masks:
                    masks[L.bias_key][c] = key_out[L.node]
                kept += int(syn.sum())
                total += syn.numel()
                nonzero_frac.append(float((contrib != 0).float().mean()))
            c_in = torch.sign(contrib).sum(0)
            for P in info.producers[L.node]:
                contrib_acc[P] += _to_producer(c_in, out_units[P], L.node)
        for P in info.producers[first_removed]:
            key_units[c] |= _expand(key_out[P], cut_units)
        for nrm in mt_norms:
            ch = torch.zeros(state[nrm.weight_key or nrm.bias_key].shape[0], dtype=torch.bool)
            for P in info.producers[nrm.node]:
                ch |= _expand(key_out[P], ch.numel())
            for key in (nrm.weight_key, nrm.bias_key):
                if key in masks:
                    masks[key][c] = ch
    stats = {
        "q": q,
        "layers_in_mt": [L.node for L in mt_layers],
        "key_synapse_fraction": kept / max(total, 1),
        "nonzero_synapse_fraction": sum(nonzero_frac) / max(len(nonzero_frac), 1),
        "key_units_per_class": key_units.sum(1).tolist(),
        "cut_units": cut_units,
    }
    return SliceResult(q, k, cut, masks, key_units, stats)


def full_slice(info: GraphInfo, prof: Profile, p: int) -> SliceResult:
    """DARE-s (paper 4.2): no slicing, every weight of M_T tuned and every output unit in the loss."""
    res = slice_model(info, prof, 1.0, p)
    res.masks = {k: torch.ones_like(v) for k, v in res.masks.items()}
    res.key_units = torch.ones_like(res.key_units)
    res.stats = {**res.stats, "q": 1.0, "key_synapse_fraction": 1.0, "variant": "no slicing"}
    return res
