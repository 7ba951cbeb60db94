"""Oracle mining from the training history (paper 3.2, Algorithm 1).

For each validation sample, the tutor is the history checkpoint (among the latest
``fraction`` of them) that predicts the true label with the highest confidence, and only if
that confidence beats the final model's (whose confidence counts as 0 when it is wrong). The
tutor's activations at M_T's output layer are the regression target. DARE-rand replaces the
choice by a random checkpoint (paper 4.2).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx

from .errors import Cancelled
from .profiling import run_recording


@dataclass
class MinedSet:
    x: torch.Tensor          # (M, C, H, W)
    y: torch.Tensor          # (M,)
    target: torch.Tensor     # (M, *M_T output shape): the tutor's activations at the cut
    tutor_logits: torch.Tensor  # (M, K): the tutor's logits (DARE-sl distils them)
    tutor: torch.Tensor      # (M,) index into the history of each sample's tutor
    candidates: int          # validation samples considered
    window: list[str]        # names of the checkpoints mined

    def to_state(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, s: dict) -> "MinedSet":
        return cls(**s)


def _load(scratch: fx.GraphModule, state: dict) -> None:
    missing, unexpected = scratch.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model lacks: {unexpected[:3]}")


@torch.no_grad()
def _predict(gm: fx.GraphModule, x: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    return torch.cat([torch.softmax(gm(x[i:i + batch_size].to(device)).float(), 1).cpu()
                      for i in range(0, len(x), batch_size)])


def _empty_like_outputs(gm: fx.GraphModule, x: torch.Tensor, cut_node: str, output_node: str,
                        device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-row targets and logits with the shapes a non-empty mine would have, (0, *cut) and
    (0, K), so that a set with no tutor still flows through tuning (which then has nothing to
    do) instead of failing on a shapeless tensor."""
    if not len(x):
        return torch.empty(0), torch.empty(0)
    vals = run_recording(gm, x[:1].to(device), {cut_node, output_node})
    return vals[cut_node][:0].cpu(), vals[output_node][:0].cpu()


@torch.no_grad()
def mine_oracles(gm: fx.GraphModule, cut_node: str, output_node: str, history: Sequence,
                 x: torch.Tensor, y: torch.Tensor, *, fraction: float = 0.5, mode: str = "best",
                 seed: int = 0, batch_size: int = 500, device: str = "cpu",
                 progress: Callable[[float], None] = lambda f: None,
                 cancelled: Callable[[], bool] = lambda: False) -> MinedSet:
    """``history``: checkpoints with ``.name`` and ``.state`` (GM naming), oldest first."""
    t = len(history)
    window = list(history[t - max(1, math.ceil(t * fraction)):])
    probs = _predict(gm, x, batch_size, device)
    conf = probs.gather(1, y.unsqueeze(1)).squeeze(1)
    conf = torch.where(probs.argmax(1) == y, conf, torch.zeros_like(conf))
    scratch = copy.deepcopy(gm).to(device)
    steps = len(window) * 2
    if mode == "best":
        tutor = torch.full_like(y, -1)
        for i, ck in enumerate(window):
            if cancelled():
                raise Cancelled()
            _load(scratch, ck.state)
            p = _predict(scratch, x, batch_size, device)
            ci = p.gather(1, y.unsqueeze(1)).squeeze(1)
            better = (p.argmax(1) == y) & (ci > conf)
            tutor[better] = i
            conf = torch.where(better, ci, conf)
            progress((i + 1) / steps)
    elif mode == "random":
        g = torch.Generator().manual_seed(seed)
        tutor = torch.randint(0, len(window), y.shape, generator=g)
    else:
        raise ValueError(f"mode must be 'best' or 'random', not {mode!r}")

    idx = torch.nonzero(tutor >= 0).squeeze(1)
    targets: dict[int, torch.Tensor] = {}
    logits: dict[int, torch.Tensor] = {}
    for i in tutor[idx].unique().tolist():
        if cancelled():
            raise Cancelled()
        sel = idx[tutor[idx] == i]
        _load(scratch, window[i].state)
        outs_t, outs_l = [], []
        for s in range(0, len(sel), batch_size):
            vals = run_recording(scratch, x[sel[s:s + batch_size]].to(device), {cut_node, output_node})
            outs_t.append(vals[cut_node].cpu())
            outs_l.append(vals[output_node].cpu())
        for j, (tt, ll) in zip(sel.tolist(), zip(torch.cat(outs_t), torch.cat(outs_l))):
            targets[j], logits[j] = tt, ll
        progress(0.5 + 0.5 * len(targets) / max(len(idx), 1))
    order = idx.tolist()
    if order:
        target, tutor_logits = (torch.stack([d[j] for j in order]) for d in (targets, logits))
    else:
        target, tutor_logits = _empty_like_outputs(gm, x, cut_node, output_node, device)
    return MinedSet(
        x=x[idx].clone(), y=y[idx].clone(), target=target, tutor_logits=tutor_logits,
        tutor=tutor[idx].clone(), candidates=len(x), window=[ck.name for ck in window])
