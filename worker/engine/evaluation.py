"""Robustness evaluation of an original model and its hardened candidates (DESIGN.md, "Evaluation").

Per attack the report carries three numbers, all plain accuracies on ``n`` test points (the paper's
Empirical Robustness is "the testing accuracy over the attacking inputs", paper 4.3):

* ``original_accuracy``: the original model on the adversarial set made against itself;
* ``transfer_er``: a hardened model on that same set (the paper's number; the set is generated
  once per attack and reused for every candidate, so candidates are compared on identical inputs);
* ``adaptive_accuracy``: a hardened model on the attack re-run against itself (white-box), which is
  what an attacker who holds the hardened model would do.

Two threat settings:

``fixed_eps``
    Every attack with the dataset's stated parameters (``attacks.default_params``); ``cfg.eps``
    replaces the L-inf budget of FGSM, BIM and PGD.
``minimal``
    The paper authors' artifact: per-sample minimal perturbations. Only clean-correct points whose
    attack succeeded are kept, so ``original_accuracy`` is 0 by construction and ``n`` is the number
    kept. A minimal attack has no budget, so "adaptive accuracy" there is the fraction of the kept
    points on which the minimal attack re-run against the hardened model fails (see ``params``).

This module does not use ART's ``empirical_robustness``: that is a perturbation-size ratio, a
different quantity.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Callable

import torch
from torch import nn

from .config import EvaluationConfig
from .errors import Cancelled
from .threat import attacking_check, budget_check, linf_budget

LINF_ATTACKS = ("fgsm", "bim", "pgd")
SANITY_MAX_SAMPLES = 100  # the sanity checks run 5+ extra attacks per model: a subset is enough

Progress = Callable[[float], None]


def _attacks_api():
    # Imported lazily: the attack package is heavy (AutoAttack, JSMA) and this keeps ``accuracy`` and
    # ``predict`` usable on their own.
    from . import attacks

    return attacks


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameterless model)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def set_eval(model: nn.Module) -> nn.Module:
    """``model.eval()``, tolerating exported GraphModules, which refuse it: their train/eval
    behaviour was fixed when they were exported (BN and dropout are inference ops already)."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels, int64 (N,) on the CPU. x: (N, C, H, W) on any device."""
    set_eval(model)
    dev = model_device(model)
    out = [model(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``x`` (N, C, H, W) that ``model`` labels ``y`` (N,). Raises on an empty set."""
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((predict(model, x, batch_size) == y.cpu()).float().mean())


class _Meter:
    """Turns "n samples attacked" ticks into a monotone overall fraction for ``progress``."""

    def __init__(self, total: float, progress: Progress) -> None:
        self.total, self.done, self.progress = max(float(total), 1.0), 0.0, progress

    def tick(self, units: float) -> None:
        self.done = min(self.total, self.done + units)
        self.progress(self.done / self.total)


def run_batched(attack, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, device,
                tick: Callable[[float], None] = lambda n: None,
                cancelled: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """``attack(x, y)`` batch by batch; returns the adversarial examples on the CPU.

    ``cancelled()`` is polled before every batch and raises ``Cancelled``.
    """
    out = []
    for i in range(0, len(x), batch_size):
        if cancelled():
            raise Cancelled()
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out.append(attack(xb, yb).detach().cpu())
        tick(len(xb))
    return torch.cat(out) if out else x[:0].clone()


def run_minimal_batched(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        batch_size: int, tick=lambda n: None,
                        cancelled=lambda: False) -> tuple[torch.Tensor, torch.Tensor]:
    """``attacks.minimal_attack`` in chunks so cancellation is polled between them."""
    api = _attacks_api()
    dev = model_device(model)
    advs, oks = [], []
    for i in range(0, len(x), batch_size):
        if cancelled():
            raise Cancelled()
        xa, ok = api.minimal_attack(name, model, x[i:i + batch_size].to(dev),
                                    y[i:i + batch_size].to(dev), batch_size=batch_size)
        advs.append(xa.detach().cpu())
        oks.append(ok.detach().cpu().bool())
        tick(min(batch_size, len(x) - i))
    if not advs:
        return x[:0].clone(), torch.zeros(0, dtype=torch.bool)
    return torch.cat(advs), torch.cat(oks)


def attack_kwargs(name: str, eps: float | None) -> dict:
    """``cfg.eps`` is an L-inf budget: it applies to FGSM, BIM and PGD only (C&W is L2, JSMA L0)."""
    return {"eps": eps} if (eps is not None and name in LINF_ATTACKS) else {}


def select_samples(n_total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded choice of ``min(n, n_total)`` indices, sorted (the same points for every model)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:min(n, n_total)].sort().values


def evaluate(original: nn.Module, hardened: dict[str, nn.Module], splits, cfg: EvaluationConfig, *,
             seed: int = 0, device="cpu", progress: Progress = lambda f: None,
             cancelled: Callable[[], bool] = lambda: False, reuse_sanity: dict | None = None) -> dict:
    """Attack ``original`` and every model in ``hardened`` on the same ``cfg.n_samples`` test points.

    original, hardened values: classifiers returning logits; they are moved to ``device`` and put in
    eval mode. splits: ``data.Splits`` (x in [0, 1], (N, C, H, W)).

    Returns ``{"protocol", "eps", "n_samples", "clean", "clean_on_samples", "attacks",
    "sanity_checks", "pgd_curve", "timings_s", "n_test"}`` (``timings_s``: seconds per attack, all
    models); ``clean`` is measured on the whole test split of ``n_test`` points (it decides the
    clean-accuracy budget), ``clean_on_samples`` on the attacked points. See the module docstring
    for the per-attack numbers. ``seed`` chooses the points; the attacks' own randomness (PGD's
    random start, JSMA's targets) is seeded by their parameters, which the report records.
    Raises ``Cancelled`` when ``cancelled()`` turns true.
    """
    from .sanity import pgd_eps_grid, run_sanity

    if "original" in hardened:
        raise ValueError("'original' is reserved for the model being hardened")
    api = _attacks_api()
    dev = torch.device(device)
    models = {"original": set_eval(original.to(dev))}
    models.update({k: set_eval(m.to(dev)) for k, m in hardened.items()})
    names = list(hardened)

    idx = select_samples(len(splits.x_test), cfg.n_samples, seed)
    x, y = splits.x_test[idx], splits.y_test[idx]
    n = len(x)
    bs = cfg.batch_size
    threat = linf_budget(cfg.eps, splits.name, splits.x_test)
    eps = threat["eps"]
    grid = pgd_eps_grid(eps)
    n_sanity = min(n, SANITY_MAX_SAMPLES)

    runs_per_attack = 1 + (len(names) if cfg.adaptive else 0)
    meter = _Meter(n * len(cfg.attacks) * runs_per_attack
                   + n_sanity * (4 + len(grid)) * len(models), progress)

    clean = {k: accuracy(m, splits.x_test, splits.y_test, bs) for k, m in models.items()}
    clean_on_samples = {k: accuracy(m, x, y, bs) for k, m in models.items()}

    attacks: dict[str, dict] = {}
    timings: dict[str, float] = {}
    aa_checks: list[dict] = []
    for name in cfg.attacks:
        t0 = time.perf_counter()
        if name == "autoattack":
            # AutoAttack has a budget; under ``minimal`` there is none to give it.
            if cfg.protocol == "fixed_eps":
                attacks[name] = _autoattack(models, names, x, y, eps, cfg, seed, dev, meter,
                                            cancelled, aa_checks)
            else:
                meter.tick(n * runs_per_attack)
        elif cfg.protocol == "fixed_eps":
            attacks[name] = _fixed_eps(name, models, names, x, y, splits.name, cfg, eps, dev, meter,
                                       cancelled)
        else:
            attacks[name] = _minimal(name, models, names, x, y, cfg, meter, cancelled)
        if name in attacks:
            timings[name] = time.perf_counter() - t0

    # The threat model's own checks: a budget that cannot move a pixel, attacks that change nothing.
    changed = {a: r["changed_predictions"] for a, r in attacks.items() if "changed_predictions" in r}
    threat_checks = [{**budget_check(eps, threat["intensity_step"]), "model": "original"}]
    if changed:
        threat_checks.append(attacking_check(changed))
    threat_checks = [{"name": f"original: {c['name']}", "passed": c["passed"], "detail": c["detail"]}
                     for c in threat_checks]
    if cfg.protocol == "fixed_eps" and "cw" in attacks:
        cw = attacks["cw"]["params"]
        threat.update(cw_l2_radius=cw["l2_radius"], cw_l2_source=cw["l2_radius_source"])
    # The sanity checks depend on the models, the points, the seed and the L-inf budget, not on the
    # protocol: a caller that evaluates the same models again under the other protocol passes the
    # first result's ``sanity`` block back instead of paying for them twice.
    key = {"models": list(models), "n": n, "n_sanity": n_sanity, "seed": seed, "eps": eps,
           "dataset": splits.name}
    if reuse_sanity is not None and reuse_sanity.get("key") == key:
        sanity, curve = reuse_sanity["sanity_checks"], reuse_sanity["pgd_curve"]
    else:
        sanity, curve = list(threat_checks), {"eps": grid}
        for k, m in models.items():
            checks, accs = run_sanity(m, x[:n_sanity], y[:n_sanity], splits.name, eps=eps, device=dev,
                                      batch_size=bs, tick=meter.tick, cancelled=cancelled)
            sanity += [{**c, "name": f"{k}: {c['name']}"} for c in checks]
            curve[k] = accs
    progress(1.0)
    return {"threat_model": {"linf_eps": eps, "linf_source": threat["source"],
                             "intensity_step": threat["intensity_step"],
                             **{k: v for k, v in threat.items() if k.startswith("cw_")}},
            "protocol": cfg.protocol, "eps": eps if cfg.protocol == "fixed_eps" else None,
            "n_samples": n, "n_test": len(splits.x_test), "clean": clean,
            "clean_on_samples": clean_on_samples,
            "attacks": attacks, "sanity_checks": sanity + aa_checks,
            "pgd_curve": curve,
            "timings_s": timings,
            "sanity": {"key": key, "sanity_checks": sanity, "pgd_curve": curve}}


def l2_stats(model, x, x_adv, y, batch_size: int) -> dict:
    """Median and quartiles of the L2 norms of the successful (misclassified) perturbations."""
    ok = predict(model, x_adv, batch_size) != y.cpu()
    norms = (x_adv - x).flatten(1).norm(dim=1)[ok]
    if len(norms) == 0:
        return {"n_successful": 0, "median": None, "q1": None, "q3": None}
    q = torch.quantile(norms.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))
    return {"n_successful": int(ok.sum()), "q1": float(q[0]), "median": float(q[1]),
            "q3": float(q[2])}


def bound_l2(x: torch.Tensor, x_adv: torch.Tensor, radius: float) -> torch.Tensor:
    """``x_adv`` where its L2 distance to ``x`` is within ``radius``, else ``x`` (the attack failed
    within the budget: the point is scored on its clean image)."""
    within = (x_adv - x).flatten(1).norm(dim=1) <= radius
    return torch.where(within.view(-1, *([1] * (x.dim() - 1))), x_adv, x)


def _fixed_eps(name, models, names, x, y, dataset, cfg, eps, dev, meter, cancelled) -> dict:
    api = _attacks_api()
    kw = attack_kwargs(name, eps)
    bounded = name == "cw"
    if bounded:
        radius, source = api.budgets.cw_l2_radius(dataset, x.shape[1:])
        if cfg.cw_l2_radius is not None:
            radius, source = cfg.cw_l2_radius, "evaluation.cw_l2_radius in the job's config"
    l2 = {}

    def attack(k):
        atk = api.make_attack(name, models[k], dataset=dataset, **kw)
        adv = run_batched(atk, x, y, batch_size=cfg.batch_size, device=dev, tick=meter.tick,
                          cancelled=cancelled)
        if bounded:
            l2[k] = l2_stats(models[k], x, adv, y, cfg.batch_size)
            adv = bound_l2(x, adv, radius)
        return atk, adv

    atk, x_adv = attack("original")
    per_model = {}
    for k in names:
        transfer = accuracy(models[k], x_adv, y, cfg.batch_size)
        adaptive = None
        if cfg.adaptive:
            adaptive = accuracy(models[k], attack(k)[1], y, cfg.batch_size)
        per_model[k] = {"transfer_er": transfer, "adaptive_accuracy": adaptive}
        if bounded:
            per_model[k]["l2_perturbation"] = l2.get(k)
    params = {**atk.params(), "threat_model": "fixed_eps",
              "accuracy": "plain accuracy on the adversarial examples of all n points"}
    on_adv = predict(models["original"], x_adv, cfg.batch_size)  # one pass for both figures
    out = {"params": params, "n": len(x),
           "original_accuracy": float((on_adv == y.cpu()).float().mean()),
           "per_model": per_model,
           "changed_predictions": int((on_adv != predict(models["original"], x,
                                                         cfg.batch_size)).sum())}
    if bounded:
        params.update({"l2_radius": radius, "l2_radius_source": source,
                       "accuracy": "plain accuracy on all n points, an adversarial example counting "
                                   "only within l2_radius of its clean image (else the clean image "
                                   "is scored)"})
        out["l2_perturbation"] = {"original": l2["original"],
                                  "note": "L2 norms of the successful perturbations of the "
                                          "unbounded attack: n_successful, median, quartiles"}
    return out


def _minimal(name, models, names, x, y, cfg, meter, cancelled) -> dict:
    api = _attacks_api()
    orig = models["original"]
    x_adv, ok = run_minimal_batched(name, orig, x, y, batch_size=cfg.batch_size, tick=meter.tick,
                                    cancelled=cancelled)
    norm_name = MINIMAL_NORMS[name]
    # Keep clean-correct points whose adversarial example the original really misclassifies here:
    # a minimal perturbation sits on the boundary, so the attack's own success flag and this
    # forward pass can disagree in the last bit; deciding by one set of predictions makes
    # original_accuracy exactly 0 instead of "almost".
    adv_pred = predict(orig, x_adv, cfg.batch_size)
    keep = ok & (predict(orig, x, cfg.batch_size) == y) & (adv_pred != y)
    xk, yk, x_adv_k = x[keep], y[keep], x_adv[keep]
    n = int(keep.sum())
    # The size of each kept point's minimal perturbation: what distinguishes models here (an
    # unbounded attack succeeds on almost every point, so its success rate says little).
    sizes = {"original": perturbation_norms(norm_name, xk, x_adv_k)}
    per_model = {}
    for k in names:
        transfer = accuracy(models[k], x_adv_k, yk, cfg.batch_size) if n else None
        adaptive = None
        if cfg.adaptive:
            if n:
                xa_h, ok_h = run_minimal_batched(name, models[k], xk, yk, batch_size=cfg.batch_size,
                                                 tick=meter.tick, cancelled=cancelled)
                # A point counts as robust when the hardened model gets it right clean and the
                # minimal attack fails on it.
                right = predict(models[k], xk, cfg.batch_size) == yk
                robust = (~ok_h) & right
                adaptive = float(robust.float().mean())
                # a point the model gets wrong clean needs no perturbation; a failed attack: inf
                sz = perturbation_norms(norm_name, xk, xa_h)
                sizes[k] = torch.where(right, torch.where(ok_h, sz, torch.full_like(sz, float("inf"))),
                                       torch.zeros_like(sz))
            meter.tick(len(x) - n)
        per_model[k] = {"transfer_er": transfer, "adaptive_accuracy": adaptive}
        if k in sizes:
            per_model[k]["minimal_perturbation"] = size_stats(sizes[k])
    params = {"threat_model": "minimal", "attack": name, **api.minimal_params(name),
              "attacked": len(x),
              "kept": "clean-correct points whose minimal adversarial example fools the original "
                      "(original_accuracy is 0 on them by construction)",
              "adaptive_metric": "fraction of the kept points that the hardened model classifies "
                                 "correctly and on which the minimal attack re-run against it "
                                 "fails; the attack is unbounded, so values near 0 are expected"}
    grid = budget_grid(sizes)
    return {"params": params, "n": n,
            "original_accuracy": float((adv_pred[keep] == yk).float().mean()) if n else None,
            "per_model": per_model,
            "minimal_perturbation": {
                "norm": norm_name, "original": size_stats(sizes["original"]),
                "curve": {"budget": grid, **{k: [float((v > b).float().mean()) if len(v) else None
                                                 for b in grid] for k, v in sizes.items()}},
                "note": "per kept point, the size of the smallest perturbation the attack found "
                        f"({norm_name}); curve: robust accuracy (minimal perturbation larger than "
                        "the budget) as a function of the budget"}}


MINIMAL_NORMS = {"fgsm": "linf", "bim": "linf", "pgd": "linf", "cw": "l2", "jsma": "l0"}


def perturbation_norms(norm: str, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per-point size of ``x_adv - x`` (N,): L-inf, L2, or L0 (the number of changed values)."""
    d = (x_adv - x).flatten(1)
    if norm == "linf":
        return d.abs().amax(1) if d.shape[1] else d.new_zeros(len(d))
    if norm == "l2":
        return d.norm(dim=1)
    return (d.abs() > 1e-6).sum(1).to(x.dtype)


def size_stats(sizes: torch.Tensor) -> dict:
    """n, median and quartiles of perturbation sizes (inf: the attack failed; counted in n)."""
    if len(sizes) == 0:
        return {"n": 0, "median": None, "q1": None, "q3": None, "failed": 0}
    q = torch.quantile(sizes.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))
    return {"n": len(sizes), "q1": float(q[0]), "median": float(q[1]), "q3": float(q[2]),
            "failed": int(torch.isinf(sizes).sum())}


def budget_grid(sizes: dict, steps: int = 11) -> list[float]:
    """Budgets from 0 to the largest finite perturbation size seen, for the accuracy curve."""
    finite = [float(v[torch.isfinite(v)].max()) for v in sizes.values()
              if len(v) and torch.isfinite(v).any()]
    top = max(finite, default=0.0) or 1.0
    # Three significant digits keep the curve's axis labels short; the top is rounded up, so the
    # last budget still covers the largest size seen (every kept point falls there).
    unit = 10 ** (math.floor(math.log10(top)) - 2)
    top = math.ceil(top / unit - 1e-9) * unit
    return [float(f"{top * i / (steps - 1):.3g}") for i in range(steps - 1)] + [float(f"{top:.3g}")]


def _autoattack(models, names, x, y, eps, cfg, seed, dev, meter, cancelled, checks_out) -> dict:
    """AutoAttack against the original (its adversarial examples also give the transfer figure)
    and, when adaptive, against every hardened model. Robust accuracy is the original's: a point
    counts when it is clean-correct and no sub-attack broke it."""
    from .attacks import autoattack as aa

    version = cfg.autoattack.version

    def run(model):
        res = aa.run_autoattack(model, x, y, eps=eps, version=version, seed=seed,
                                batch_size=cfg.batch_size, device=dev, tick=meter.tick,
                                cancelled=cancelled)
        # count / n, as the original computes it (a float32 mean differs in the last bits)
        return res, int(res["robust"].sum()) / len(x)

    orig, orig_acc = run(models["original"])
    checks_out += [{**c, "name": f"original: {c['name']}"} for c in orig["checks"]]
    breakdown = {"original": orig["breakdown"]}
    per_model = {}
    for k in names:
        transfer = accuracy(models[k], orig["x_adv"], y, cfg.batch_size)
        adaptive = None
        if cfg.adaptive:
            res, adaptive = run(models[k])
            checks_out += [{**c, "name": f"{k}: {c['name']}"} for c in res["checks"]]
            breakdown[k] = res["breakdown"]
        per_model[k] = {"transfer_er": transfer, "adaptive_accuracy": adaptive,
                        "breakdown": breakdown.get(k)}
    params = {**aa.params(eps=eps, version=version, seed=seed, n_classes=orig["n_classes"]),
              "threat_model": "fixed_eps"}
    clean_ok = int(round(orig["breakdown"]["clean"] * len(x)))
    return {"params": params, "n": len(x), "original_accuracy": orig_acc,
            "per_model": per_model, "breakdown": breakdown,
            "changed_predictions": clean_ok - int(orig["robust"].sum())}
