"""Masked tuning of M_T and synchronisation back into M (paper 3.3), and the tuning variants.

Batches are drawn one class at a time, so each step has one class's masks and key neurons.
Masking the gradient is not enough with Adam (its moments keep moving "frozen" weights), so
after every step the weights outside that class's masks are put back from a copy taken before
the step: every weight outside the masks stays bit-identical, by construction.

M_T shares its parameter objects with a working copy of M, so tuning M_T tunes that copy in
place; "sync" is handing back the copy, whose removed last p layers were never in the optimiser.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .config import TuneConfig
from .errors import Cancelled
from .mining import MinedSet
from .resume import Resume, load_epoch, save_epoch
from .slicing import SliceResult
from .transform import build_mt, key_neuron_loss


def _class_batches(y: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled mini-batches of indices, each holding samples of one class only."""
    batches = []
    for c in y.unique().tolist():
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        batches += list(idx.split(batch_size))
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def tune_dare(gm: fx.GraphModule, sliced: SliceResult, mined: MinedSet, cfg: TuneConfig, *,
              adv_attack: Callable[[torch.nn.Module], Callable] | None = None, seed: int = 0,
              device: str = "cpu", progress: Callable[[float], None] = lambda f: None,
              cancelled: Callable[[], bool] = lambda: False,
              on_epoch: Callable[[int, torch.nn.Module], None] = lambda e, m: None,
              resume: Resume | None = None) -> tuple[fx.GraphModule, dict]:
    """Tune M_T on the mined set with the key-neuron loss, updating only each class's key synapses.

    ``adv_attack(model)`` (DARE-adv) returns an attack ``(x, y) -> x_adv`` against the current
    full model; its examples are regressed to the clean sample's tutor target as well (the
    caller's ``resume`` key must cover the attack's settings).
    ``on_epoch(k, model)`` sees the synchronised model after epoch k (the selection scores its
    snapshots there). ``resume``: where each epoch is checkpointed, after its ``on_epoch``, and
    resumed from (``worker.engine.resume``). Returns the synchronised full model (a tuned copy of
    ``gm``) and a summary.
    """
    t0 = time.perf_counter()
    if resume is not None:
        resume = resume.child("tune_dare", cfg, seed, str(device), adv_attack is not None, gm,
                              sliced.cut_node, sliced.masks, sliced.key_units, mined.x, mined.y,
                              mined.target)
    work = copy.deepcopy(gm).to(device)
    _freeze_all(work)
    mt = build_mt(work, sliced.cut_node)
    params = {k: mt.get_parameter(k) for k in sliced.masks}
    for p in params.values():
        p.requires_grad_(True)
    masks = {k: m.to(device) for k, m in sliced.masks.items()}
    key_units = sliced.key_units.to(device)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    x, y, target = mined.x.to(device), mined.y.to(device), mined.target.to(device)
    losses = []
    if len(y) == 0:
        return work, {"epochs": 0, "steps": 0, "loss_first": None, "loss_last": None,
                      "seconds": 0.0, "note": "no mined samples: the model is unchanged"}
    steps = 0
    start, acc = load_epoch(resume, model=work, optimizer=opt, generator=gen, device=device)
    if acc is not None:
        losses, steps, t0 = acc["losses"], acc["steps"], time.perf_counter() - acc["seconds"]
        progress(start / cfg.epochs)
    for epoch in range(start, cfg.epochs):
        total, count = 0.0, 0
        for b in _class_batches(y.cpu(), cfg.batch_size, gen):
            if cancelled():
                raise Cancelled()
            b = b.to(device)
            c = int(y[b[0]])
            xb, tb = x[b], target[b]
            loss = key_neuron_loss(mt(xb), tb, key_units[c])
            if adv_attack is not None:
                xa = adv_attack(work)(xb, y[b])
                loss = loss + key_neuron_loss(mt(xa), tb, key_units[c])
            before = {k: p.detach().clone() for k, p in params.items()}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    p.grad.mul_(masks[k][c])
            opt.step()
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(torch.where(masks[k][c], p, before[k]))
            total += loss.item() * len(b)
            count += len(b)
            steps += 1
        losses.append(total / max(count, 1))
        on_epoch(epoch + 1, work)
        save_epoch(resume, epoch + 1, model=work, optimizer=opt, generator=gen, device=device,
                   acc={"losses": losses, "steps": steps, "seconds": time.perf_counter() - t0})
        progress((epoch + 1) / cfg.epochs)
    for p in work.parameters():
        p.requires_grad_(True)
    return work, {"epochs": cfg.epochs, "steps": steps, "loss_first": losses[0],
                  "loss_last": losses[-1], "seconds": time.perf_counter() - t0}


def tune_full_model(gm: fx.GraphModule, mined: MinedSet, cfg: TuneConfig, *, seed: int = 0,
                    device: str = "cpu", progress: Callable[[float], None] = lambda f: None,
                    cancelled: Callable[[], bool] = lambda: False,
                    on_epoch: Callable[[int, torch.nn.Module], None] = lambda e, m: None,
                    resume: Resume | None = None) -> tuple[fx.GraphModule, dict]:
    """DARE-sl (paper 4.2): no transformation and no slicing: M itself, every weight, tuned on the
    same mined data with M's own kind of loss (cross-entropy), here against the tutor's
    predicted distribution, which is what the mined data carries at M's output layer.
    ``on_epoch`` and ``resume``: as for :func:`tune_dare`."""
    t0 = time.perf_counter()
    if resume is not None:
        resume = resume.child("tune_full_model", cfg, seed, str(device), gm, mined.x,
                              mined.tutor_logits)
    work = copy.deepcopy(gm).to(device)
    opt = torch.optim.Adam(work.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    x, soft = mined.x.to(device), torch.softmax(mined.tutor_logits.float(), 1).to(device)
    losses = []
    start, acc = load_epoch(resume, model=work, optimizer=opt, generator=gen, device=device)
    if acc is not None:
        losses, t0 = acc["losses"], time.perf_counter() - acc["seconds"]
        progress(start / cfg.epochs)
    for epoch in range(start, cfg.epochs if len(x) else 0):
        total = 0.0
        for b in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            if cancelled():
                raise Cancelled()
            b = b.to(device)
            loss = F.cross_entropy(work(x[b]), soft[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        losses.append(total / len(x))
        on_epoch(epoch + 1, work)
        save_epoch(resume, epoch + 1, model=work, optimizer=opt, generator=gen, device=device,
                   acc={"losses": losses, "seconds": time.perf_counter() - t0})
        progress((epoch + 1) / cfg.epochs)
    return work, {"epochs": cfg.epochs, "loss_first": losses[0] if losses else None,
                  "loss_last": losses[-1] if losses else None, "seconds": time.perf_counter() - t0}
