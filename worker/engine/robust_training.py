"""Hardening methods stronger than the paper's baselines: TRADES, N-FGSM, AWP, and DARE then TRADES.

Every method here is adversarial FINE-TUNING of the uploaded model: users send trained models, so
training starts from their weights, and the L-inf radius grows linearly from 0 to the job's budget
over the first ``robust.eps_ramp_epochs`` epochs (capped at half the epochs, so at least half the
training runs at the full budget). A trained model suddenly met with examples at the full budget
takes a large loss step that can wreck its clean accuracy; the ramp is the usual remedy (the
N-FGSM code ramps eps over 5 epochs on SVHN for the same reason). ``robust.eps_ramp_epochs: 0``
trains at the full budget from the first step. The budget is the one the evaluation attacks with
(``threat.linf_budget``), so training and the report share one threat model.

No maintained library implements these faithfully for our models: ART's TRADES trainer makes x'
with its PGD attack on the cross-entropy rather than on TRADES' KL term, ART has no N-FGSM, and
every ART trainer wants its numpy classifier wrapper. So each recipe is written here from the
papers and the authors' code (read, not copied) in the engine's style: pure functions on a batch,
``torch.autograd.grad`` with respect to the input, project-clamp-detach at every step.

The recipes, with what their papers prescribe
---------------------------------------------
TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off between
Robustness and Accuracy", ICML 2019, arXiv:1901.08573; code yaodongyu/TRADES)::

    loss = CE(f(x), y) + beta * KL(f(x) || f(x'))          (batch mean)
    x'   = K signed-gradient ascent steps of size a on KL(f(x) || f(x')) from x + 0.001 * N(0, 1),
           each projected onto the eps-ball around x and onto [0, 1]

The paper uses eps 0.3, a 0.01, K 40, beta 1 on MNIST and eps 8/255, a 0.007, K 10, beta 6 on
CIFAR-10. Here eps is the job's budget, K = ``robust.attack_steps`` (10), a = eps / 4 (CIFAR's
0.007 / 0.031 = 0.23, the engine's PGD step fraction), and beta is searched over
``robust.trades_beta_grid`` (default the paper's two settings, {1, 6}). f(x) is held fixed inside
the maximisation (the authors recompute the same value at every step); the outer loss
differentiates through both f(x) and f(x'), as the authors' code does.

N-FGSM (de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez & Dokania, "Make Some Noise: Reliable and
Efficient Single-Step Adversarial Training", NeurIPS 2022, arXiv:2202.01181; code pdejorge/N-FGSM)::

    x_n = clip01(x + eta),  eta ~ U(-k eps, k eps), k = 2
    x'  = clip01(x_n + alpha * sign(grad_x CE(f(x_n), y))),  alpha = eps
    loss = CE(f(x'), y)

with NO projection back onto the eps-ball (``|x' - x|_inf`` reaches 3 eps; the paper shows that
the projection is what brings catastrophic overfitting back). One extra forward and backward per
batch: about twice the cost of plain training. k and alpha / eps are ``robust.nfgsm_noise`` and
``robust.nfgsm_step``.

AWP (Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020,
arXiv:2004.05884; code csdongxian/AWP). Per batch, after the base method made x'::

    v_W = gamma * ||W|| * g_W / ||g_W||,  g_W = grad_W of the base loss, for every weight W
    step the optimiser with the gradient of the base loss at W + v, then take v back out

Only parameters of two or more dimensions (conv kernels, dense matrices) are perturbed; biases and
BatchNorm parameters are not, as in the authors' code. The authors find g with one SGD step of a
proxy copy and take the difference; after the layer-wise normalisation that difference is exactly
the normalised gradient, so it is computed directly (no proxy copy). gamma: 0.01 on PGD-AT and
0.005 on TRADES (the authors' settings), or ``robust.awp_gamma``. The base is PGD-AT (Madry et
al. 2018: CE on PGD-K examples, random start, step eps / 4) or TRADES with beta
``robust.awp_trades_beta`` (6, the AWP paper's): both are in the grid (``robust.awp_bases``) and
the validation selection keeps the better. Where the architecture gives nothing to perturb (a
graph whose weights are buffers or constants rather than parameters, so no parameter has two
dimensions) AWP cannot run: ``awp`` raises ``MethodUnavailable`` (compare lists the method as
skipped with that reason; ``method: "awp"`` fails the job with the code ``method_unavailable``).

dare_trades: DARE's tuning (``tuning.tune_dare``, the tune stage's recipe) and then TRADES
fine-tuning from DARE's weights, with TRADES' grid and selection. Sequential rather than one
combined loss: (1) it tests the paper's claim that DARE complements adversarial training directly,
since ``dare_trades`` and ``trades`` differ only in the starting weights; (2) a joint loss would
need a weight between DARE's key-neuron regression and TRADES (one more hyper-parameter), and
DARE's one-class batches and per-class masks do not fit TRADES' mixed batches; (3) the adversarial
step goes last, because a non-adversarial tune after adversarial training tends to undo its
robustness. The clean-accuracy budget is measured against the uploaded model, not DARE's.

Selection and bookkeeping are the baselines' (``baselines.select_run``): one copy per grid point,
judged on at most ``baselines.VAL_MAX`` validation points by clean accuracy and the dataset's PGD
(40 steps) at the budget, re-run against each candidate. Every method goes through
``baselines._fit`` (Adam, the model kept in ``eval()``; see there) with a per-batch loss.
Per-batch randomness is drawn from a generator seeded by (seed, epoch, batch position), so a run is
reproducible and does not depend on what ran before it.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import baselines
from .errors import InputError
from .evaluation import (
    _Meter,
    accuracy,
    attack_kwargs,
    run_batched,
    select_samples,
    set_eval,
)

Progress = Callable[[float], None]
BatchLoss = Callable[[nn.Module, Tensor, Tensor, tuple[int, int]], Tensor]

TRADES_START_STD = 0.001  # the authors' x + 0.001 * N(0, 1) start
STEP_FRACTION = 0.25      # inner step size a = eps / 4
AWP_GAMMA = {"pgd": 0.01, "trades": 0.005}  # csdongxian/AWP's settings per base


class MethodUnavailable(InputError):
    """The method cannot run on this model; the message says why."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__("method_unavailable", f"{method} cannot run on this model: {reason}",
                         "choose another method (compare skips this one and says so)")
        self.method = method
        self.reason = reason


# ------------------------------------------------------------------------------------------------
# The recipes, one batch at a time. x: (B, C, H, W) in [0, 1], y: (B,) int64; the model is in eval
# mode and its parameters may require grad (only the input is differentiated here).


def ramp_eps(budget: float, epoch: int, start: int, n: int, ramp_epochs: float) -> float:
    """The radius for the batch at position ``start`` of ``n`` in ``epoch`` (0-based): linear from
    0 at the first batch to ``budget`` after ``ramp_epochs`` epochs, then ``budget``."""
    if ramp_epochs <= 0:
        return budget
    return budget * min(1.0, (epoch + start / n) / ramp_epochs)


def effective_ramp(ramp_epochs: float, epochs: int) -> float:
    """The ramp actually used: at most half the epochs, so half the training is at the budget."""
    return min(ramp_epochs, epochs / 2)


def trades_example(model: nn.Module, x: Tensor, eps: float, *, steps: int, step_size: float,
                   gen: torch.Generator) -> Tensor:
    """TRADES' inner maximisation: x' within ``eps`` (L-inf) of x and in [0, 1] maximising
    KL(f(x) || f(x')), from x + 0.001 * N(0, 1). Returns x' (B, C, H, W), detached."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    xa = x + TRADES_START_STD * torch.randn(x.shape, generator=gen, device=x.device)
    for _ in range(steps):
        xa.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(xa), dim=1), p_clean, reduction="sum")
        (g,) = torch.autograd.grad(kl, xa)
        xa = xa.detach() + step_size * g.sign()
        xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0.0, 1.0)
    return xa.detach()


def trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """CE(f(x), y) + beta * KL(f(x) || f(x')), both terms averaged over the batch."""
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    if beta == 0:
        return ce
    kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                  reduction="batchmean")
    return ce + beta * kl


def nfgsm_example(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, noise: float = 2.0,
                  step: float = 1.0, gen: torch.Generator) -> Tensor:
    """N-FGSM: one FGSM step of ``step * eps`` from x + U(-noise * eps, noise * eps), clamped to
    [0, 1] and deliberately NOT projected onto the eps-ball. Returns x', detached."""
    eta = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * (noise * eps)
    xn = (x + eta).clamp(0.0, 1.0).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xn), y), xn)
    return (xn.detach() + step * eps * g.sign()).clamp(0.0, 1.0)


def weight_perturbation(model: nn.Module, loss: Tensor, gamma: float) -> list[tuple[nn.Parameter, Tensor]]:
    """AWP's ascent direction: for every parameter W of two or more dimensions,
    v_W = gamma * ||W|| * g_W / ||g_W|| with g_W the gradient of ``loss``. Returns (W, v) pairs."""
    params = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [(p, gamma * p.detach().norm() * g / (g.norm() + 1e-20))
            for p, g in zip(params, grads) if g is not None]


def perturbable(model: nn.Module) -> bool:
    return any(p.dim() > 1 for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Per-batch losses for baselines._fit


def _batch_gen(seed: int, epoch: int, start: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + start)
    return g


class _Schedule:
    """The radius and the random generator of a batch, from its (epoch, start) position."""

    def __init__(self, budget: float, n: int, ramp_epochs: float, seed: int) -> None:
        self.budget, self.n, self.ramp, self.seed = budget, n, ramp_epochs, seed

    def __call__(self, at: tuple[int, int], device) -> tuple[float, torch.Generator]:
        epoch, start = at
        return (ramp_eps(self.budget, epoch, start, self.n, self.ramp),
                _batch_gen(self.seed, epoch, start, device))


def trades_batch_loss(sched: _Schedule, beta: float, steps: int) -> BatchLoss:
    def loss(model, xb, yb, at):
        eps, gen = sched(at, xb.device)
        xa = trades_example(model, xb, eps, steps=steps, step_size=eps * STEP_FRACTION, gen=gen) \
            if eps > 0 else xb
        return trades_loss(model, xb, xa, yb, beta)
    return loss


def nfgsm_batch_loss(sched: _Schedule, noise: float, step: float) -> BatchLoss:
    def loss(model, xb, yb, at):
        eps, gen = sched(at, xb.device)
        xa = nfgsm_example(model, xb, yb, eps, noise=noise, step=step, gen=gen) if eps > 0 else xb
        return F.cross_entropy(model(xa), yb)
    return loss


def _pgd_example(model, xb, yb, eps: float, steps: int, sched: _Schedule, at, dataset):
    """Madry PGD-AT's example: the attack factory's PGD (random start, step eps / 4) against the
    current weights, its random start seeded from the batch's position."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=_batch_gen(sched.seed, *at, "cpu")))
    return baselines._make_attack("pgd", model, dataset=dataset, eps=eps, steps=steps, seed=seed)(xb, yb)


def awp_batch_loss(sched: _Schedule, base: str, rcfg, dataset: str | None) -> tuple[BatchLoss, Callable[[], None]]:
    """AWP on ``base`` ("pgd" or "trades"): the loss at W + v, and the hook that removes v after
    the optimiser step. x' is made at the unperturbed weights, as in the authors' code."""
    gamma = rcfg.awp_gamma if rcfg.awp_gamma is not None else AWP_GAMMA[base]
    held: list[tuple[nn.Parameter, Tensor]] = []

    def base_terms(model, xb, yb, at):
        eps, gen = sched(at, xb.device)
        if base == "trades":
            xa = trades_example(model, xb, eps, steps=rcfg.attack_steps,
                                step_size=eps * STEP_FRACTION, gen=gen) if eps > 0 else xb
            return lambda m: trades_loss(m, xb, xa, yb, rcfg.awp_trades_beta)
        xa = _pgd_example(model, xb, yb, eps, rcfg.attack_steps, sched, at, dataset) if eps > 0 else xb
        return lambda m: F.cross_entropy(m(xa), yb)

    def loss(model, xb, yb, at):
        objective = base_terms(model, xb, yb, at)
        if gamma > 0:
            held[:] = weight_perturbation(model, objective(model), gamma)
            with torch.no_grad():
                for p, v in held:
                    p.add_(v)
        return objective(model)

    def restore():
        with torch.no_grad():
            for p, v in held:
                p.sub_(v)
        held.clear()

    return loss, restore


# ------------------------------------------------------------------------------------------------
# Grid search and selection on validation (the baselines' rule)


def _search(method: str, start: nn.Module, original: nn.Module, splits, cfg, grid: list[dict],
            make_loss: Callable[[dict, int], tuple[BatchLoss, Callable[[], None]]], *, eps: float,
            clean_drop_limit: float, seed: int, dev, progress: Progress,
            cancelled: Callable[[], bool]) -> tuple[nn.Module, dict]:
    """Fine-tune one copy of ``start`` per grid point, judge each on validation against
    ``original``'s clean accuracy, keep the selected one."""
    xs, ys = baselines._train_subset(splits, cfg.max_train, seed)
    vidx = select_samples(len(splits.x_val), baselines.VAL_MAX, seed)
    xv, yv = splits.x_val[vidx], splits.y_val[vidx]
    meter = _Meter(len(xs) * cfg.epochs * len(grid) + len(xv) * (1 + len(grid)), progress)

    def val_robust(m: nn.Module) -> float:
        atk = baselines._make_attack("pgd", m, dataset=splits.name, **attack_kwargs("pgd", eps))
        return accuracy(m, run_batched(atk, xv, yv, batch_size=baselines.ATTACK_BATCH, device=dev,
                                       tick=meter.tick, cancelled=cancelled), yv)

    base_clean, base_robust = accuracy(original, xv, yv), val_robust(original)
    runs, best_state, train_s = [], None, 0.0
    for point in grid:
        m = set_eval(copy.deepcopy(start))
        batch_loss, after_step = make_loss(point, len(xs))
        t0 = time.perf_counter()
        fit = baselines._fit(m, xs, ys, lr=point["lr"], epochs=cfg.epochs,
                             batch_size=cfg.batch_size, seed=seed, tick=meter.tick,
                             cancelled=cancelled, batch_loss=batch_loss, after_step=after_step)
        train_s += time.perf_counter() - t0
        for p in m.parameters():
            p.requires_grad_(False)
        vc = accuracy(m, xv, yv)
        run = {**point, "val_clean": vc, "val_robust": val_robust(m),
               "within_budget": vc >= base_clean - clean_drop_limit - 1e-12,
               "final_loss": baselines._finite_or_none(fit["final_loss"]),
               "diverged": fit["diverged"], "steps": fit["steps"]}
        runs.append(run)
        if baselines.select_run(runs) is run:
            best_state = copy.deepcopy(m.state_dict())
        del m
    chosen = baselines.select_run(runs)
    model = copy.deepcopy(start)
    model.load_state_dict(best_state)
    set_eval(model)
    for p in model.parameters():
        p.requires_grad_(True)
    info = {"method": method, "eps": eps, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "n_train": len(xs), "n_val": len(xv), "clean_drop_limit": clean_drop_limit,
            "init": "fine-tuned from the uploaded model's weights",
            "original_val": {"clean": base_clean, "robust": base_robust},
            "selection": "highest validation PGD accuracy (re-run against each run) among runs "
                         "within the clean budget",
            "grid": runs, "chosen": chosen, "within_budget": chosen["within_budget"],
            "train_seconds": train_s, "gen_seconds": 0.0}
    return model, info


def _setup(model: nn.Module, device, eps: float | None, splits):
    from .attacks import budgets

    dev = torch.device(device)
    original = set_eval(model.to(dev))
    budget = eps if eps is not None else budgets.linf_eps(splits.name)
    return dev, original, budget


def trades(model: nn.Module, splits, cfg, rcfg, *, eps: float | None = None,
           clean_drop_limit: float = 0.10, seed: int = 0, device="cpu",
           progress: Progress = lambda f: None, cancelled: Callable[[], bool] = lambda: False,
           start: nn.Module | None = None, method: str = "trades") -> tuple[nn.Module, dict]:
    """TRADES fine-tuning (module docstring). cfg: ``BaselineConfig`` (epochs, lr_grid,
    batch_size, max_train); rcfg: ``RobustConfig``; ``eps``: the job's L-inf budget (None: the
    dataset's). ``start``: the weights to fine-tune (default ``model``'s); the clean budget is
    always measured against ``model``. Returns ``(hardened copy, info)``."""
    dev, original, budget = _setup(model, device, eps, splits)
    ramp = effective_ramp(rcfg.eps_ramp_epochs, cfg.epochs)
    grid = [{"lr": lr, "beta": b} for lr in cfg.lr_grid for b in rcfg.trades_beta_grid]

    def make(point, n):
        sched = _Schedule(budget, n, ramp, seed)
        return trades_batch_loss(sched, point["beta"], rcfg.attack_steps), lambda: None

    start = original if start is None else set_eval(start.to(dev))
    hardened, info = _search(method, start, original, splits, cfg, grid, make, eps=budget,
                             clean_drop_limit=clean_drop_limit, seed=seed, dev=dev,
                             progress=progress, cancelled=cancelled)
    info.update(eps_ramp_epochs=ramp, attack={"name": "trades_kl", "steps": rcfg.attack_steps,
                                              "step_size": budget * STEP_FRACTION,
                                              "start_std": TRADES_START_STD},
                source="Zhang et al., ICML 2019 (TRADES)")
    progress(1.0)
    return hardened, info


def nfgsm(model: nn.Module, splits, cfg, rcfg, *, eps: float | None = None,
          clean_drop_limit: float = 0.10, seed: int = 0, device="cpu",
          progress: Progress = lambda f: None,
          cancelled: Callable[[], bool] = lambda: False) -> tuple[nn.Module, dict]:
    """N-FGSM fine-tuning (module docstring); arguments as ``trades``."""
    dev, original, budget = _setup(model, device, eps, splits)
    ramp = effective_ramp(rcfg.eps_ramp_epochs, cfg.epochs)

    def make(point, n):
        return nfgsm_batch_loss(_Schedule(budget, n, ramp, seed), rcfg.nfgsm_noise,
                                rcfg.nfgsm_step), lambda: None

    hardened, info = _search("nfgsm", original, original, splits, cfg,
                             [{"lr": lr} for lr in cfg.lr_grid], make, eps=budget,
                             clean_drop_limit=clean_drop_limit, seed=seed, dev=dev,
                             progress=progress, cancelled=cancelled)
    info.update(eps_ramp_epochs=ramp, attack={"name": "nfgsm", "noise": rcfg.nfgsm_noise * budget,
                                              "step": rcfg.nfgsm_step * budget, "projection": None},
                source="de Jorge et al., NeurIPS 2022 (N-FGSM)")
    progress(1.0)
    return hardened, info


def awp(model: nn.Module, splits, cfg, rcfg, *, eps: float | None = None,
        clean_drop_limit: float = 0.10, seed: int = 0, device="cpu",
        progress: Progress = lambda f: None,
        cancelled: Callable[[], bool] = lambda: False) -> tuple[nn.Module, dict]:
    """AWP on PGD-AT and/or TRADES (module docstring); arguments as ``trades``. Raises
    ``MethodUnavailable`` when the model has no parameter of two or more dimensions."""
    if not perturbable(model):
        raise MethodUnavailable("awp", "no weight of the model is a parameter with two or more "
                                       "dimensions (its weights are graph constants), so there is "
                                       "no weight to perturb")
    dev, original, budget = _setup(model, device, eps, splits)
    ramp = effective_ramp(rcfg.eps_ramp_epochs, cfg.epochs)
    grid = [{"lr": lr, "base": b} for lr in cfg.lr_grid for b in dict.fromkeys(rcfg.awp_bases)]

    def make(point, n):
        return awp_batch_loss(_Schedule(budget, n, ramp, seed), point["base"], rcfg, splits.name)

    hardened, info = _search("awp", original, original, splits, cfg, grid, make, eps=budget,
                             clean_drop_limit=clean_drop_limit, seed=seed, dev=dev,
                             progress=progress, cancelled=cancelled)
    info.update(eps_ramp_epochs=ramp,
                gamma={b: rcfg.awp_gamma if rcfg.awp_gamma is not None else AWP_GAMMA[b]
                       for b in rcfg.awp_bases},
                attack={"steps": rcfg.attack_steps, "step_size": budget * STEP_FRACTION,
                        "trades_beta": rcfg.awp_trades_beta},
                source="Wu et al., NeurIPS 2020 (AWP)")
    progress(1.0)
    return hardened, info


def dare_trades(model: nn.Module, dare_model: nn.Module, dare_info: dict, splits, cfg, rcfg,
                **kw) -> tuple[nn.Module, dict]:
    """TRADES fine-tuning of DARE's tuned model (module docstring); the clean budget is measured
    against ``model``, the upload. ``kw`` as ``trades``."""
    hardened, info = trades(model, splits, cfg, rcfg, start=dare_model, method="dare_trades", **kw)
    info.update(phases=["dare", "trades"], dare=dare_info,
                init="DARE's tuned model (tune stage recipe), then TRADES fine-tuning")
    return hardened, info
