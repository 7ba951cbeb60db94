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
- Key synapses are ranked per class and per layer by their contribution over *all* synapses of
  the layer, and exactly the bottom ``1 - q`` (rounded to whole synapses) are frozen, as the paper
  freezes 5 % per class at q = 95 %. Ties (many synapses contribute exactly zero) are broken by
  position, lowest flat index frozen first, so the masks depend only on the contributions. The
  paper ranks by cumulative sign counts; with class-mean deltas every synapse is visited once per
  class, so the count is a sign and the real-valued contribution orders synapses within it.
  (An earlier version ranked only the non-zero synapses, which froze most of M_T: on lenet/digits
  only 41 % of its weights could move.)
- Key neurons are the neurons key synapses touch, on either side.
- Biases are tuned with their neuron; a BatchNorm channel is tuned when the channel it
  normalises is a key neuron.
"""
from __future__ import annotations

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


def frozen_count(n: int, q: float) -> int:
    """How many of ``n`` synapses the bottom ``1 - q`` is: rounded, never all of them."""
    return min(n - 1, int(round((1.0 - q) * n + 1e-9))) if n else 0


def top_fraction(contrib: torch.Tensor, q: float) -> torch.Tensor:
    """Mask of ``contrib``'s entries with the bottom ``1 - q`` of them (by value; ties: lowest
    flat index first) left out, i.e. exactly ``frozen_count(numel, q)`` entries are False."""
    flat = contrib.flatten()
    frozen = frozen_count(flat.numel(), q)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if frozen:
        # A stable sort keeps equal values in index order: the tie-break is by position.
        keep[torch.argsort(flat, stable=True)[:frozen]] = False
    return keep.view_as(contrib)


def frozen_shares(masks: dict[str, torch.Tensor], weight_keys: dict[str, str]) -> dict:
    """The share of M_T's weights a class may not move (mean over classes), per layer and
    overall (every masked tensor: weights, biases, norms), and the share no class may move."""
    per_layer = {node: round(1.0 - float(masks[key].float().mean()), 6)
                 for node, key in weight_keys.items() if key in masks}
    classes = next(iter(masks.values())).shape[0] if masks else 1
    total = max(1, sum(m[0].numel() for m in masks.values()))  # elements of one class's masks
    movable_per_class = sum(int(m.sum()) for m in masks.values()) / classes
    movable_by_some = sum(int(m.any(0).sum()) for m in masks.values())
    return {"per_layer": per_layer,
            "overall": round(1.0 - movable_per_class / total, 6),
            "by_every_class": round(1.0 - movable_by_some / total, 6)}


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
        "frozen_share": frozen_shares(masks, {L.node: L.weight_key for L in mt_layers}),
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
    res.stats = {**res.stats, "q": 1.0, "key_synapse_fraction": 1.0, "variant": "no slicing",
                 "frozen_share": frozen_shares(res.masks, {})}
    return res
