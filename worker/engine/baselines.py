"""The comparison baselines: adversarial training (paper 4.2) and the ``finetune_mined`` control.

``adversarial_training`` follows the paper's procedure (4.3-4.4): adversarial examples of training
points are generated against the ORIGINAL model once (offline), then a copy of the model is
fine-tuned on clean plus adversarial examples, with a small grid search (learning rate x share of
the adversarial loss) judged on the validation split. Runs whose validation clean accuracy falls
more than ``clean_drop_limit`` below the original's are excluded, as the paper confines the
accuracy decline to at most 10 points.

``pgd_online_training`` is Madry et al.'s variant: PGD examples are made against the current
weights at every batch. ``finetune_mined`` is plain cross-entropy fine-tuning on given samples (the
DARE-mined set), the control that shows whether DARE's slicing and loss add anything
(DESIGN.md, pitfalls).

All three keep the copy in ``eval()`` mode while training, see ``_fit``. Generation and training
are timed separately (paper Table 5).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import Cancelled
from .evaluation import (
    accuracy,
    attack_kwargs,
    model_device,
    run_batched,
    select_samples,
    set_eval,
)
from .resume import Resume, load_epoch, save_epoch
from .selection import select_run  # the grid rule, shared with compare's selection

ATTACK_BATCH = 250
VAL_MAX = 1000  # validation points used to pick a grid run (attacked once per run)

Progress = Callable[[float], None]


def _make_attack(name, model, dataset=None, **overrides):
    from .attacks import make_attack

    return make_attack(name, model, dataset=dataset, **overrides)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, epochs: int,
         batch_size: int, adv_fraction: float = 0.0, adversary=None, weight_decay: float = 0.0,
         seed: int = 0, tick=lambda n: None, cancelled=lambda: False,
         on_epoch: Callable[[int, nn.Module], None] = lambda e, m: None,
         batch_loss: Callable | None = None, after_step: Callable[[], None] = lambda: None,
         resume: Resume | None = None) -> dict:
    """Fine-tune ``model`` in place with Adam on cross-entropy.

    loss = (1 - adv_fraction) * CE(x) + adv_fraction * CE(adversary(idx, x, y)), where
    ``adversary`` returns the adversarial batch for the batch's indices (offline: a lookup;
    online: an attack on the current weights). Returns ``{"final_loss", "diverged", "steps",
    "adversary_seconds"}``; training stops at the first non-finite loss.

    Three hooks: ``batch_loss(model, xb, yb, (epoch, start))`` replaces that loss
    (``robust_training``'s methods; ``epoch`` 0-based, ``start`` the batch's first position in
    the epoch, for schedules and per-batch seeds). ``after_step()`` runs after every optimiser
    step, and before stopping on a non-finite loss: AWP takes its weight perturbation back out
    there. ``on_epoch(k, model)`` runs after epoch k (1-based, after that epoch's last
    ``after_step``): the selection scores its epoch snapshots there.

    ``resume`` (``worker.engine.resume``): each epoch is checkpointed there, after its
    ``on_epoch``, and a re-run continues from the last one, with the same result as an
    uninterrupted run. The key covers the arguments and the starting weights; the caller's key
    must cover what the adversary depends on.
    """
    # Exported graphs (torch.export) have BatchNorm and dropout baked in as inference ops and
    # refuse train() altogether, so train mode means nothing for them. Staying in eval() makes a
    # plain nn.Module (onnx2torch output, tests) behave the same way: BN statistics frozen, no
    # dropout. Every method thus fine-tunes the same function, like for like with DARE's tuning.
    set_eval(model)
    dev = model_device(model)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    if resume is not None:
        resume = resume.child("fit", lr, epochs, batch_size, adv_fraction, weight_decay, seed,
                              str(dev), model, x, y)
    last, diverged, steps, adv_s = float("nan"), False, 0, 0.0

    def checkpoint(done: int) -> None:
        save_epoch(resume, done, model=model, optimizer=opt, generator=g, device=dev,
                   acc={"final_loss": last, "diverged": diverged, "steps": steps, "adv_s": adv_s})

    start, acc = load_epoch(resume, model=model, optimizer=opt, generator=g, device=dev)
    if acc is not None:
        last, diverged, steps, adv_s = acc["final_loss"], acc["diverged"], acc["steps"], acc["adv_s"]
        tick(n * start)
    for epoch in range(start, epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            if cancelled():
                raise Cancelled()
            idx = perm[i:i + batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            loss = torch.zeros((), device=dev)
            if batch_loss is not None:
                loss = batch_loss(model, xb, yb, (epoch, i))
            if batch_loss is None and adv_fraction < 1.0:
                loss = loss + (1.0 - adv_fraction) * F.cross_entropy(model(xb), yb)
            if batch_loss is None and adv_fraction > 0.0:
                t0 = time.perf_counter()
                xa = adversary(idx, xb, yb).to(dev)
                adv_s += time.perf_counter() - t0
                loss = loss + adv_fraction * F.cross_entropy(model(xa), yb)
            if not torch.isfinite(loss):
                after_step()
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            after_step()
            last, steps = float(loss.detach()), steps + 1
            tick(len(idx))
        if diverged:
            checkpoint(epochs)  # a diverged run is finished: a re-run does not retry it
            break
        on_epoch(epoch + 1, model)
        checkpoint(epoch + 1)
    opt.zero_grad(set_to_none=True)
    return {"final_loss": last, "diverged": diverged, "steps": steps, "adversary_seconds": adv_s}


def finite_or_none(v):
    return v if (v is None or math.isfinite(v)) else None


def _grid_search(original: nn.Module, splits, cfg, *, method: str, attack: str, train_x, train_y,
                 adversary_for: Callable[[nn.Module], Callable], clean_drop_limit: float, seed: int,
                 dev, meter, cancelled, eps: float | None = None) -> tuple[nn.Module, dict]:
    """Train one copy per (lr, adv_fraction), judge each on validation, keep the selected one."""
    vidx = select_samples(len(splits.x_val), VAL_MAX, seed)
    xv, yv = splits.x_val[vidx], splits.y_val[vidx]

    def val_robust(m: nn.Module) -> float:
        atk = _make_attack(attack, m, dataset=splits.name, **attack_kwargs(attack, eps))
        return accuracy(m, run_batched(atk, xv, yv, batch_size=ATTACK_BATCH, device=dev,
                                       tick=meter.tick, cancelled=cancelled), yv)

    base_clean, base_robust = accuracy(original, xv, yv), val_robust(original)
    runs, best_state, best_key = [], None, None
    train_s = adv_s = 0.0
    for lr in cfg.lr_grid:
        for frac in cfg.adv_fraction_grid:
            m = copy.deepcopy(original)
            t0 = time.perf_counter()
            fit = _fit(m, train_x, train_y, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       adv_fraction=frac, adversary=adversary_for(m), seed=seed, tick=meter.tick,
                       cancelled=cancelled)
            train_s += time.perf_counter() - t0 - fit["adversary_seconds"]
            adv_s += fit["adversary_seconds"]
            for p in m.parameters():
                p.requires_grad_(False)
            vc = accuracy(m, xv, yv)
            run = {"lr": lr, "adv_fraction": frac, "val_clean": vc, "val_robust": val_robust(m),
                   "within_budget": vc >= base_clean - clean_drop_limit - 1e-12,
                   "final_loss": finite_or_none(fit["final_loss"]), "diverged": fit["diverged"]}
            runs.append(run)
            if select_run(runs) is run:
                best_state, best_key = copy.deepcopy(m.state_dict()), (lr, frac)
            del m
    chosen = select_run(runs)
    model = copy.deepcopy(original)
    model.load_state_dict(best_state)
    set_eval(model)
    assert best_key == (chosen["lr"], chosen["adv_fraction"])
    info = {"method": method, "attack": attack, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "n_train": len(train_x), "n_val": len(xv), "clean_drop_limit": clean_drop_limit,
            "original_val": {"clean": base_clean, "robust": base_robust},
            "selection": "highest validation robust accuracy (attack re-run against each run) "
                         "among runs within the clean budget",
            "grid": runs, "chosen": chosen, "within_budget": chosen["within_budget"],
            "train_seconds": train_s, "online_gen_seconds": adv_s}
    return model, info


def train_subset(splits, max_train: int, seed: int):
    idx = select_samples(len(splits.x_train), max_train, seed)
    return splits.x_train[idx], splits.y_train[idx]


def offline_examples(original: nn.Module, attack: str, xs: torch.Tensor, ys: torch.Tensor, *,
                     dataset: str | None, eps: float | None, device, tick=lambda n: None,
                     cancelled=lambda: False) -> tuple[torch.Tensor, dict, float]:
    """The paper's offline adversarial examples: ``attack`` against the ORIGINAL model, made once.
    Returns ``(x_adv on the CPU, the attack's parameters, seconds)``."""
    attack = attack.removeprefix("at_")
    t0 = time.perf_counter()
    gen = _make_attack(attack, original, dataset=dataset, **attack_kwargs(attack, eps))
    x_adv = run_batched(gen, xs, ys, batch_size=ATTACK_BATCH, device=device, tick=tick,
                        cancelled=cancelled)
    return x_adv, gen.params(), time.perf_counter() - t0


def online_adversary(m: nn.Module, *, dataset: str | None, eps: float | None):
    """Madry et al.'s adversary for ``_fit``: PGD against ``m``'s current weights at every batch.
    Returns ``(adversary, the attack's parameters)``."""
    atk = _make_attack("pgd", m, dataset=dataset, **attack_kwargs("pgd", eps))

    def adv(idx, xb, yb):
        out = atk(xb, yb).detach()
        m.zero_grad(set_to_none=True)
        return out

    return adv, atk.params()


def adversarial_training(model: nn.Module, attack: str, splits, cfg, *, clean_drop_limit: float = 0.10,
                         seed: int = 0, device="cpu", progress: Progress = lambda f: None,
                         cancelled: Callable[[], bool] = lambda: False,
                         eps: float | None = None) -> tuple[nn.Module, dict]:
    """Offline adversarial training against ``attack`` ("fgsm" ... or "at_fgsm" ...), paper 4.2.

    ``eps``: the job's L-inf budget (``threat.linf_budget``), so FGSM/BIM/PGD training and the
    evaluation share one threat model; None keeps the dataset's budget.

    cfg: ``config.BaselineConfig``. Returns ``(hardened copy, info)`` with info
    ``{"method", "grid", "chosen", "gen_seconds", "train_seconds", "within_budget", ...}``; the
    input model is not modified (it is moved to ``device``).
    """
    from .evaluation import _Meter

    attack = attack.removeprefix("at_")
    dev = torch.device(device)
    original = set_eval(model.to(dev))
    xs, ys = train_subset(splits, cfg.max_train, seed)
    n_grid = len(cfg.lr_grid) * len(cfg.adv_fraction_grid)
    n_val = min(VAL_MAX, len(splits.x_val))
    meter = _Meter(len(xs) * (1 + n_grid * cfg.epochs) + n_val * (1 + n_grid), progress)

    x_adv, gen_params, gen_s = offline_examples(original, attack, xs, ys, dataset=splits.name,
                                                eps=eps, device=dev, tick=meter.tick,
                                                cancelled=cancelled)

    hardened, info = _grid_search(
        original, splits, cfg, method=f"at_{attack}", attack=attack, train_x=xs, train_y=ys,
        adversary_for=lambda m: (lambda idx, xb, yb: x_adv[idx]),
        clean_drop_limit=clean_drop_limit, seed=seed, dev=dev, meter=meter, cancelled=cancelled,
        eps=eps)
    info.pop("online_gen_seconds")
    info.update(gen_seconds=gen_s, attack_params=gen_params,
                original_train_adv_accuracy=accuracy(original, x_adv, ys))
    progress(1.0)
    return hardened, info


def pgd_online_training(model: nn.Module, splits, cfg, *, clean_drop_limit: float = 0.10, seed: int = 0,
                        device="cpu", progress: Progress = lambda f: None,
                        cancelled: Callable[[], bool] = lambda: False,
                        eps: float | None = None) -> tuple[nn.Module, dict]:
    """Madry-style adversarial training: PGD examples made online, each batch, against the weights
    being trained (the dataset's PGD parameters). Same grid and selection as
    ``adversarial_training``; ``gen_seconds`` is the time spent inside the attack."""
    from .evaluation import _Meter

    dev = torch.device(device)
    original = set_eval(model.to(dev))
    xs, ys = train_subset(splits, cfg.max_train, seed)
    n_grid = len(cfg.lr_grid) * len(cfg.adv_fraction_grid)
    n_val = min(VAL_MAX, len(splits.x_val))
    meter = _Meter(len(xs) * n_grid * cfg.epochs + n_val * (1 + n_grid), progress)
    params = {}

    def adversary_for(m):
        adv, p = online_adversary(m, dataset=splits.name, eps=eps)
        params.update(p)
        return adv

    hardened, info = _grid_search(
        original, splits, cfg, method="at_pgd_online", attack="pgd", train_x=xs, train_y=ys,
        adversary_for=adversary_for, clean_drop_limit=clean_drop_limit, seed=seed, dev=dev,
        meter=meter, cancelled=cancelled, eps=eps)
    info["gen_seconds"] = info.pop("online_gen_seconds")
    info["attack_params"] = params
    progress(1.0)
    return hardened, info


def finetune_mined(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, *, seed: int = 0, device="cpu",
                   progress: Progress = lambda f: None,
                   cancelled: Callable[[], bool] = lambda: False,
                   on_epoch: Callable[[int, nn.Module], None] = lambda e, m: None,
                   resume: Resume | None = None) -> tuple[nn.Module, dict]:
    """Plain cross-entropy fine-tuning of a copy on (x, y) (the DARE-mined samples): the control.
    ``on_epoch`` and ``resume``: as in ``_fit``.

    cfg: ``config.TuneConfig`` (the same epochs, lr, batch size and weight decay DARE tunes with, so
    only DARE's slicing, loss and weight masks differ) or a ``BaselineConfig`` (its first lr).
    x: (N, C, H, W) in [0, 1]; y: (N,). Returns ``(copy, info)``.
    """
    from .evaluation import _Meter

    dev = torch.device(device)
    lr = getattr(cfg, "lr", None) or cfg.lr_grid[0]
    wd = getattr(cfg, "weight_decay", 0.0)
    m = set_eval(copy.deepcopy(model.to(dev)))
    meter = _Meter(len(x) * cfg.epochs, progress)
    t0 = time.perf_counter()
    fit = {"final_loss": None, "diverged": False, "steps": 0}
    if len(x):
        fit = _fit(m, x, y, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size, weight_decay=wd,
                   seed=seed, tick=meter.tick, cancelled=cancelled, on_epoch=on_epoch,
                   resume=resume)
    progress(1.0)
    return m, {"method": "finetune_mined", "n": len(x), "epochs": cfg.epochs, "lr": lr,
               "batch_size": cfg.batch_size, "weight_decay": wd,
               "final_loss": finite_or_none(fit["final_loss"]), "diverged": fit["diverged"],
               "steps": fit["steps"], "gen_seconds": 0.0,
               "train_seconds": time.perf_counter() - t0}
