"""Hardening methods stronger than the paper's baselines: TRADES, N-FGSM, AWP, and DARE then TRADES.

Every method here is adversarial FINE-TUNING of the uploaded model: users send trained models, so
training starts from their weights, and the L-inf radius grows linearly from 0 to the job's budget
over the first ``robust.eps_ramp_epochs`` epochs (capped at half the smallest epochs value of the
method's grid, so every run and every epoch snapshot the selection scores trains at least half its
epochs at the full budget, and a snapshot equals the shorter run). A trained model suddenly met with examples at the full budget
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
0.007 / 0.031 = 0.23, the engine's PGD step fraction), and beta is a grid parameter
(``selection.adversarial.beta``, default the paper's two settings, {1, 6}). f(x) is held fixed inside
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
``robust.awp_trades_beta`` (6, the AWP paper's): the base is a grid parameter
(``selection.adversarial.awp_base``, default both) and the validation selection keeps the better.
Where the architecture gives nothing to perturb (a graph whose weights are buffers or constants
rather than parameters, so no parameter has two dimensions) AWP cannot run: its registry entry
says so (``unavailable``), compare lists it under ``skipped`` with that reason, and
``method: "awp"`` fails the job with the code ``method_unavailable``.

dare_trades: TRADES fine-tuning from DARE's chosen model (``needs=("dare",)``: DARE's own grid,
selected on the same split), with TRADES' grid and selection. Sequential rather than one
combined loss: (1) it tests the paper's claim that DARE complements adversarial training directly,
since ``dare_trades`` and ``trades`` differ only in the starting weights; (2) a joint loss would
need a weight between DARE's key-neuron regression and TRADES (one more hyper-parameter), and
DARE's one-class batches and per-class masks do not fit TRADES' mixed batches; (3) the adversarial
step goes last, because a non-adversarial tune after adversarial training tends to undo its
robustness. The clean-accuracy budget is measured against the uploaded model, not DARE's.

Every method is a ``methods.MethodSpec`` (registered at the bottom of this module): grid family
``adversarial`` (epochs x lr, plus beta for TRADES and dare_trades and the base for AWP), trained
on the adversarial baselines' training subset, judged by ``selection.select_method`` like every
other method. One grid point is one ``fine_tune`` call: ``baselines._fit`` (Adam, the model kept
in ``eval()``; see there) with a per-batch loss. Per-batch randomness is drawn from a generator
seeded by (seed, epoch, batch position), so a run is reproducible and does not depend on what ran
before it.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import baselines
from .evaluation import set_eval
from .methods import MethodSpec, MethodUnavailable, register

Progress = Callable[[float], None]
BatchLoss = Callable[[nn.Module, Tensor, Tensor, tuple[int, int]], Tensor]

TRADES_START_STD = 0.001  # the authors' x + 0.001 * N(0, 1) start
STEP_FRACTION = 0.25      # inner step size a = eps / 4
AWP_GAMMA = {"pgd": 0.01, "trades": 0.005}  # csdongxian/AWP's settings per base


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
    return baselines._make_attack("pgd", model, dataset=dataset, eps=eps, steps=steps,
                                  seed=seed)(xb, yb)


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
# One grid point


ROBUST = ("trades", "nfgsm", "awp", "dare_trades")
SOURCES = {"trades": "Zhang et al., ICML 2019 (TRADES)",
           "nfgsm": "de Jorge et al., NeurIPS 2022 (N-FGSM)",
           "awp": "Wu et al., NeurIPS 2020 (AWP)",
           "dare_trades": "DARE (paper 3), then Zhang et al., ICML 2019 (TRADES)"}
NO_WEIGHT = ("no weight of the model is a parameter with two or more dimensions (its weights are "
             "graph constants), so there is no weight to perturb")


def make_loss(method: str, point: dict, rcfg, sched: _Schedule,
              dataset: str | None) -> tuple[BatchLoss, Callable[[], None]]:
    """``(batch_loss, after_step)`` for ``baselines._fit``: ``method``'s loss at ``point``'s
    settings (``beta`` for TRADES and dare_trades, ``awp_base`` for AWP)."""
    if method in ("trades", "dare_trades"):
        return trades_batch_loss(sched, point["beta"], rcfg.attack_steps), lambda: None
    if method == "nfgsm":
        return nfgsm_batch_loss(sched, rcfg.nfgsm_noise, rcfg.nfgsm_step), lambda: None
    if method == "awp":
        return awp_batch_loss(sched, point["awp_base"], rcfg, dataset)
    raise ValueError(f"unknown robust_training method {method!r}")


def recipe(method: str, point: dict, rcfg, eps: float) -> dict:
    """The settings a run used beyond its grid point, for the report."""
    inner = {"steps": rcfg.attack_steps, "step_size": eps * STEP_FRACTION}
    if method in ("trades", "dare_trades"):
        return {"attack": {"name": "trades_kl", **inner, "start_std": TRADES_START_STD}}
    if method == "nfgsm":
        return {"attack": {"name": "nfgsm", "noise": rcfg.nfgsm_noise * eps,
                           "step": rcfg.nfgsm_step * eps, "projection": None}}
    base = point["awp_base"]
    return {"attack": {"name": "pgd" if base == "pgd" else "trades_kl", **inner},
            "gamma": rcfg.awp_gamma if rcfg.awp_gamma is not None else AWP_GAMMA[base],
            **({"trades_beta": rcfg.awp_trades_beta} if base == "trades" else {})}


def fine_tune(start: nn.Module, xs: Tensor, ys: Tensor, method: str, point: dict, rcfg, *,
              eps: float, ramp_epochs: float, batch_size: int, dataset: str | None = None,
              seed: int = 0, on_epoch=lambda k, m: None, progress: Progress = lambda f: None,
              cancelled: Callable[[], bool] = lambda: False, resume=None) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``start`` with ``method`` at ``point`` (``{"epochs", "lr", ...}``) on
    ``xs`` (N, C, H, W) in [0, 1], ``ys`` (N,), against the L-inf budget ``eps``, its radius
    ramped over ``ramp_epochs`` (used as given: the caller caps it, see ``ramp_for``). Returns
    ``(model, info)``; ``start`` is left untouched. Raises ``MethodUnavailable`` for AWP on a
    model with no weight to perturb."""
    if method == "awp" and not perturbable(start):
        raise MethodUnavailable("awp", NO_WEIGHT)
    m = set_eval(copy.deepcopy(start))
    sched = _Schedule(eps, len(xs), ramp_epochs, seed)
    batch_loss, after_step = make_loss(method, point, rcfg, sched, dataset)
    total = max(1, len(xs) * point["epochs"])
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        progress(done[0] / total)

    fit = baselines._fit(m, xs, ys, lr=point["lr"], epochs=point["epochs"], batch_size=batch_size,
                         seed=seed, tick=tick, cancelled=cancelled, on_epoch=on_epoch,
                         batch_loss=batch_loss, after_step=after_step, resume=resume)
    for p in m.parameters():
        p.requires_grad_(False)
    # examples the loss sees per epoch: clean and adversarial (TRADES, AWP on TRADES) or only
    # adversarial (N-FGSM, AWP on PGD-AT); counted as the adversarial baselines count theirs
    both = method in ("trades", "dare_trades") or point.get("awp_base") == "trades"
    info = {"method": method, "eps": eps, "eps_ramp_epochs": ramp_epochs, "epochs": point["epochs"],
            "lr": point["lr"], **{k: v for k, v in point.items() if k in ("beta", "awp_base")},
            "n_train": len(xs), "n_samples": (2 if both else 1) * len(xs),
            "final_loss": baselines.finite_or_none(fit["final_loss"]), "diverged": fit["diverged"],
            "steps": fit["steps"], **recipe(method, point, rcfg, eps), "source": SOURCES[method],
            "init": ("DARE's chosen model, then TRADES fine-tuning" if method == "dare_trades"
                     else "fine-tuned from the uploaded model's weights")}
    return m, info


# ------------------------------------------------------------------------------------------------
# The registry entries: trained and chosen like every other method (selection.select_method)


def ramp_for(job, spec, point: dict) -> float:
    """``robust.eps_ramp_epochs`` capped at half the smallest epochs value the method is scored
    at (its grid's, or the run's own), so each scored snapshot equals the shorter run."""
    from .selection import grid_for

    shortest = min([point["epochs"], *grid_for(spec, job.config)["epochs"]])
    return effective_ramp(job.config.robust.eps_ramp_epochs, shortest)


def _unavailable(method: str):
    def check(job) -> str | None:
        return NO_WEIGHT if method == "awp" and not perturbable(job.original) else None
    return check


def _runner(method: str):
    def train(job, point: dict, on_epoch, progress):
        from .methods import REGISTRY

        start = job.models["dare"] if method == "dare_trades" else job.original
        xs, ys = job.train_subset()
        cfg = job.config
        return fine_tune(start.to(job.ctx.device), xs, ys, method, point, cfg.robust, eps=job.eps,
                         ramp_epochs=ramp_for(job, REGISTRY[method], point),
                         batch_size=cfg.baselines.batch_size, dataset=job.splits.name,
                         seed=cfg.seed, on_epoch=on_epoch, progress=progress,
                         cancelled=job.ctx.cancelled, resume=job.resume)
    return train


def _cost(method: str):
    """Seconds of the grid's trainings from the probe's timed batches: per batch, the inner
    attack (TRADES' and PGD-AT's K steps timed as PGD-K) plus the training forwards and
    backwards (N-FGSM: one extra forward and backward; AWP: one more for the weight ascent)."""
    def cost(job, probe, grid) -> float:
        from .selection import grid_size

        rcfg, bs = job.config.robust, job.config.baselines.batch_size
        n = min(job.config.baselines.max_train, len(job.splits.y_train))
        batches = max(1, math.ceil(n / bs)) * max(grid["epochs"])
        inner = probe.attack("pgd", bs, steps=rcfg.attack_steps)
        step = probe.step(bs)
        if method == "nfgsm":
            per = [2 * step]
        elif method == "awp":
            per = [inner + (4 if b == "trades" else 3) * step for b in grid["awp_base"]]
        else:
            per = [inner + 2 * step]
        runs_per_kind = grid_size(grid)[0] / len(per)
        return sum(runs_per_kind * batches * p for p in per)
    return cost


_PARAMS = {"trades": ("beta",), "nfgsm": (), "awp": ("awp_base",), "dare_trades": ("beta",)}
_RECIPES = {
    "trades": "TRADES (Zhang et al. 2019): CE plus beta times KL to the clean prediction, x' from "
              "K KL-ascent steps; fine-tuning with an eps ramp",
    "nfgsm": "N-FGSM (de Jorge et al. 2022): one FGSM step of eps from uniform noise of 2 eps, no "
             "projection; fine-tuning with an eps ramp",
    "awp": "AWP (Wu et al. 2020): adversarial weight perturbation on PGD-AT or TRADES; "
           "fine-tuning with an eps ramp",
    "dare_trades": "DARE's chosen model, then TRADES fine-tuning with an eps ramp",
}
for _name in ROBUST:
    register(MethodSpec(_name, "adversarial", _PARAMS[_name], _runner(_name), _cost(_name),
                        needs=("dare",) if _name == "dare_trades" else (),
                        recipe=_RECIPES[_name], unavailable=_unavailable(_name)))
