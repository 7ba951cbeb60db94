"""The methods ``compare`` (and ``auto``) can train: one registry entry each.

An entry names how to train one grid point, which selection grid it takes (``family``: a field
of ``config.SelectionConfig``), the grid parameters it takes besides epochs and lr, and what one
training costs, for the time budget. ``selection.select_method`` runs the grid and applies the
rule, the same for every entry. A new method is one ``register(MethodSpec(...))`` call in its
own module, listed in ``PLUGINS`` and imported by ``load_plugins``; its name must also be in
``config.COMPARE_METHODS`` (and, for ``method: <name>`` jobs, in ``config.METHODS``).

``train(job, point, on_epoch, progress)`` trains a copy of ``job.original`` with ``point``
(``{"epochs", "lr", ...}``), calls ``on_epoch(k, model)`` after each epoch k and returns
``(model, info)``; info's ``n_samples`` is the number of samples it tuned on.
The training a runner starts checkpoints each epoch at ``job.resume`` (``worker.engine.resume``;
``job.kw`` hands it on), which the selection points at the grid combination being trained, so a
stage re-run after a crash continues inside the combination's epochs.
``cost(job, probe, grid)`` estimates the seconds of all its trainings from ``schedule.Probe``'s
timed batches (scoring is added by the scheduler, the same for every method).
``unavailable(job)`` returns why the method cannot run on this job's model (None: it can): compare
lists it under ``skipped`` instead of training it; a job that ships it fails with
``MethodUnavailable``. A method with ``needs`` finds their chosen models in ``job.models``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import COMPARE_METHODS
from .errors import InputError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str                       # "dare" or "adversarial": the grid in config.selection
    params: tuple[str, ...]           # grid parameters besides epochs and lr
    train: Callable | None            # (job, point, on_epoch, progress) -> (model, info)
    cost: Callable                    # (job, probe, grid) -> seconds of all its trainings
    needs: tuple[str, ...] = ()       # methods whose chosen model it is made from
    control: bool = False             # measured beside the methods, never recommended
    recipe: str = ""
    unavailable: Callable | None = None  # (job) -> why it cannot run on this model, or None


class MethodUnavailable(InputError):
    """The method cannot run on this model; ``reason`` says why."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__("method_unavailable", f"{method} cannot run on this model: {reason}",
                         "choose another method (compare skips this one and says so)")
        self.method = method
        self.reason = reason


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name not in COMPARE_METHODS:
        raise ValueError(f"{spec.name!r} is not in config.COMPARE_METHODS")
    REGISTRY[spec.name] = spec
    return spec


# modules that register more methods (imported once, lazily)
PLUGINS: tuple[str, ...] = ("worker.engine.robust_training",)


def load_plugins() -> dict[str, MethodSpec]:
    import importlib

    for mod in PLUGINS:
        importlib.import_module(mod)
    return REGISTRY


# ---------------------------------------------------------------------------------------------
# What every runner reads


class MethodJob:
    """A job's inputs as the runners need them: the original model, the data, the job's L-inf
    budget (one threat model: the methods train against what the report attacks with), and
    DARE's slices and mined sets per grid value, each computed once."""

    def __init__(self, ctx) -> None:
        from .stages import load_inputs
        from .threat import linf_budget

        self.ctx, self.config = ctx, ctx.config
        model, self.history, self.splits = load_inputs(ctx)
        self.original = model.gm
        self.num_classes = model.num_outputs
        self.eps = linf_budget(self.config.evaluation.eps, self.splits.name,
                               self.splits.x_test)["eps"]
        self._slices: dict = {}
        self._offline: dict = {}
        # the chosen models of the methods that ran, for those made from them (``needs``)
        self.models: dict = {}
        self.resume = None  # where the training being run checkpoints (set by its caller)

    def kw(self, progress) -> dict:
        return dict(seed=self.config.seed, device=self.ctx.device, progress=progress,
                    cancelled=self.ctx.cancelled, resume=self.resume)

    def method_resume(self, method: str):
        """The checkpoints of ``method``'s training in this job: ``state/resume/<method>``, keyed
        by the job's config, budget and device (each loop adds its weights and data)."""
        from .resume import Resume

        return Resume(self.state("resume")).child(method, self.config, self.eps,
                                                  str(self.ctx.device))

    def state(self, name: str) -> Path:
        return self.ctx.path("state", name)

    def sliced(self, q: float):
        from .slicing import SliceResult, slice_model
        from .stages import _analysis, _load_pt

        if q not in self._slices:
            if q == self.config.q:
                self._slices[q] = SliceResult.from_state(_load_pt(self.state("slice.pt")))
            else:
                self._slices[q] = slice_model(_analysis(self.ctx), self.profile(), q, self.config.p)
        return self._slices[q]

    def full_slice(self):
        from .slicing import full_slice
        from .stages import _analysis

        if "full" not in self._slices:
            self._slices["full"] = full_slice(_analysis(self.ctx), self.profile(), self.config.p)
        return self._slices["full"]

    def profile(self):
        from .profiling import Profile
        from .stages import _load_pt

        return Profile(**_load_pt(self.state("profile.pt")))

    def mined(self, history_fraction: float, mode: str = "best"):
        """The mined set for a history fraction (the mine stage's for the config's own value)."""
        from .mining import MinedSet
        from .stages import _load_pt, _mine, _save_pt

        if history_fraction == self.config.history_fraction and mode == "best":
            return MinedSet.from_state(_load_pt(self.state("mined.pt")))
        path = self.state(f"mined_{mode}_{history_fraction:g}.pt")
        if path.exists():
            return MinedSet.from_state(_load_pt(path))
        mined = _mine(self.ctx, mode=mode, fraction=history_fraction)
        _save_pt(mined.to_state(), path)
        return mined

    def train_subset(self):
        from .baselines import train_subset

        return train_subset(self.splits, self.config.baselines.max_train, self.config.seed)

    def offline_examples(self, attack: str):
        """The offline adversarial training set for ``attack``: made once per job, shared by the
        grid's runs, and checkpointed with the method's training so a re-run does not make it
        again (the attacks leave the global random state alone: loading it is like making it)."""
        from .baselines import offline_examples

        if attack not in self._offline:
            xs, ys = self.train_subset()
            dev = torch.device(self.ctx.device)
            ck = self.method_resume(f"at_{attack}").child("offline", self.original, xs, ys)
            saved = ck.load()
            if saved is not None:
                made = saved["x_adv"], saved["params"], saved["gen_seconds"]
            else:
                made = offline_examples(self.original, attack, xs, ys, dataset=self.splits.name,
                                        eps=self.eps, device=dev, cancelled=self.ctx.cancelled)
                ck.save({"x_adv": made[0], "params": made[1], "gen_seconds": made[2]})
            self._offline[attack] = made
        return self._offline[attack]


def per_class(y: torch.Tensor, classes: int) -> list[int]:
    return torch.bincount(y.long(), minlength=classes).tolist() if len(y) else [0] * classes


# ---------------------------------------------------------------------------------------------
# The DARE family (paper 3.3 and the ablations of 4.2) and the plain fine-tune control


def _tune_cfg(job, point):
    return job.config.tune.model_copy(update={"epochs": point["epochs"], "lr": point["lr"]})


def _dare_runner(variant: str):
    def train(job: MethodJob, point: dict, on_epoch, progress):
        from .tuning import tune_dare, tune_full_model

        mined = job.mined(point["history_fraction"], "random" if variant == "dare_rand" else "best")
        cfg = _tune_cfg(job, point)
        kw = dict(job.kw(progress), on_epoch=on_epoch)
        if variant == "dare_sl":
            model, info = tune_full_model(job.original, mined, cfg, **kw)
        else:
            sliced = job.full_slice() if variant == "dare_s" else job.sliced(point["q"])
            adv = None
            if variant == "dare_adv":
                from .attacks import make_attack

                eps = job.config.tune.adv_eps if job.config.tune.adv_eps is not None else job.eps

                def adv(m):
                    return make_attack("pgd", m, dataset=job.splits.name, eps=eps, steps=5)
            model, info = tune_dare(job.original, sliced, mined, cfg, adv_attack=adv, **kw)
        info = {**info, "n_samples": len(mined.y), "candidates": mined.candidates,
                "mined_per_class": per_class(mined.y, job.num_classes),
                "history_fraction": point["history_fraction"], "window": len(mined.window)}
        if "q" in point:
            info["q"] = point["q"]
        return model, info
    return train


def _finetune_mined(job: MethodJob, point: dict, on_epoch, progress):
    from .baselines import finetune_mined

    mined = job.mined(point["history_fraction"])
    model, info = finetune_mined(job.original, mined.x, mined.y, _tune_cfg(job, point),
                                 on_epoch=on_epoch, **job.kw(progress))
    return model, {**info, "n_samples": len(mined.y),
                   "mined_per_class": per_class(mined.y, job.num_classes),
                   "history_fraction": point["history_fraction"]}


def _n_mined(job: MethodJob) -> int:
    from .mining import MinedSet
    from .stages import _load_pt

    return len(MinedSet.from_state(_load_pt(job.state("mined.pt"))).y)


def _dare_cost(pgd_steps_per_batch: int = 0):
    def cost(job: MethodJob, probe, grid) -> float:
        from .selection import grid_size

        bs = job.config.tune.batch_size
        batches = max(1, math.ceil(_n_mined(job) / bs)) * max(grid["epochs"])
        per = probe.step(bs)
        if pgd_steps_per_batch:
            per += probe.attack("pgd", bs, steps=pgd_steps_per_batch)
        return grid_size(grid)[0] * batches * per
    return cost


# ---------------------------------------------------------------------------------------------
# Adversarial training (paper 4.2; Madry et al. for the online variant)


def _offline_runner(attack: str):
    def train(job: MethodJob, point: dict, on_epoch, progress):
        from .baselines import _fit, finite_or_none
        from .evaluation import set_eval

        x_adv, params, gen_s = job.offline_examples(attack)
        xs, ys = job.train_subset()
        m = set_eval(copy.deepcopy(job.original).to(job.ctx.device))
        cfg = job.config.baselines
        fit = _fit(m, xs, ys, lr=point["lr"], epochs=point["epochs"], batch_size=cfg.batch_size,
                   adv_fraction=point["adv_fraction"], adversary=lambda idx, xb, yb: x_adv[idx],
                   seed=job.config.seed, cancelled=job.ctx.cancelled, on_epoch=on_epoch,
                   resume=job.resume)
        progress(1.0)
        return m, {"attack": attack, "attack_params": params, "gen_seconds": gen_s,
                   "n_samples": 2 * len(xs), "n_adversarial": len(xs), "epochs": point["epochs"],
                   "final_loss": finite_or_none(fit["final_loss"]), "diverged": fit["diverged"]}
    return train


def _online_pgd(job: MethodJob, point: dict, on_epoch, progress):
    from .baselines import _fit, finite_or_none, online_adversary
    from .evaluation import set_eval

    xs, ys = job.train_subset()
    m = set_eval(copy.deepcopy(job.original).to(job.ctx.device))
    adv, params = online_adversary(m, dataset=job.splits.name, eps=job.eps)
    cfg = job.config.baselines
    fit = _fit(m, xs, ys, lr=point["lr"], epochs=point["epochs"], batch_size=cfg.batch_size,
               adv_fraction=point["adv_fraction"], adversary=adv, seed=job.config.seed,
               cancelled=job.ctx.cancelled, on_epoch=on_epoch, resume=job.resume)
    progress(1.0)
    return m, {"attack": "pgd", "attack_params": params, "gen_seconds": fit["adversary_seconds"],
               "n_samples": 2 * len(xs), "n_adversarial": len(xs) * point["epochs"],
               "epochs": point["epochs"], "final_loss": finite_or_none(fit["final_loss"]),
               "diverged": fit["diverged"]}


def _adversarial_cost(attack: str | None):
    """attack None: online PGD, one attack per batch; else offline, the set made once."""
    def cost(job: MethodJob, probe, grid) -> float:
        from .selection import grid_size

        bs = job.config.baselines.batch_size
        n = min(job.config.baselines.max_train, len(job.splits.y_train))
        batches = max(1, math.ceil(n / bs)) * max(grid["epochs"])
        per = 2 * probe.step(bs) + (probe.attack("pgd", bs) if attack is None else 0.0)
        gen = 0.0 if attack is None or attack in job._offline else probe.attack(attack, n)
        return gen + grid_size(grid)[0] * batches * per
    return cost


def _no_cost(job, probe, grid) -> float:
    return 0.0


# ---------------------------------------------------------------------------------------------
# The registry

_DARE = ("q", "history_fraction")
for _name, _params, _steps, _recipe in (
        ("dare", _DARE, 0, "DARE (paper 3): masked key-neuron tuning of M_T on mined tutors"),
        ("dare_adv", _DARE, 5, "DARE plus PGD-5 examples regressed to the tutor's target"),
        ("dare_s", ("history_fraction",), 0, "ablation DARE-s: no slicing (every weight, "
                                             "every neuron)"),
        ("dare_sl", ("history_fraction",), 0, "ablation DARE-sl: M itself tuned on the tutors' "
                                              "predictions"),
        ("dare_rand", _DARE, 0, "ablation DARE-rand: a random history checkpoint as tutor")):
    register(MethodSpec(_name, "dare", _params, _dare_runner(_name), _dare_cost(_steps),
                        recipe=_recipe))
register(MethodSpec("finetune_mined", "dare", ("history_fraction",), _finetune_mined,
                    _dare_cost(), control=True,
                    recipe="control: plain cross-entropy fine-tune on DARE's mined samples"))
for _attack in ("fgsm", "bim", "pgd", "cw", "jsma"):
    register(MethodSpec(f"at_{_attack}", "adversarial", ("adv_fraction",), _offline_runner(_attack),
                        _adversarial_cost(_attack),
                        recipe=f"adversarial training on {_attack.upper()} examples made against "
                               "the original once (paper 4.2)"))
register(MethodSpec("at_pgd_online", "adversarial", ("adv_fraction",), _online_pgd,
                    _adversarial_cost(None),
                    recipe="Madry et al.: PGD examples against the current weights every batch"))
# weight_noise has no grid: it is made from DARE's chosen model (controls.weight_noise_like).
register(MethodSpec("weight_noise", "dare", (), None, _no_cost, needs=("dare",), control=True,
                    recipe="control: Gaussian noise shaped like DARE's weight change, no data"))


def compared(config, first: tuple[str, ...] = ()) -> list[str]:
    """The methods a compare runs, in the report's order (``first`` ahead of
    ``selection.methods``); a method brings the methods it is made from (``needs``) along,
    ahead of it."""
    reg = load_plugins()
    out: list[str] = []

    def add(m: str) -> None:
        if m in reg and m not in out:
            for d in reg[m].needs:
                add(d)
            out.append(m)

    for m in (*first, *(config.selection.methods or COMPARE_METHODS)):
        add(m)
    return out


def controls() -> tuple[str, ...]:
    return tuple(n for n, s in load_plugins().items() if s.control)
