"""Sanity checks on an evaluation, after Carlini et al. 2019, "On Evaluating Adversarial Robustness".

An attack that is misconfigured (a zero step size, a gradient masked by the model, a wrong label
convention) makes any model look robust. These checks catch the usual symptoms:

* an iterative attack (BIM, PGD) is at least as strong as single-step FGSM at the same budget;
* PGD with more steps is not weaker than PGD with fewer;
* accuracy does not increase as the L-inf budget grows, and reaches near zero (<= 0.05) at a large
  budget (0.5 on [0, 1] inputs, enough to turn any image grey);
* robust accuracy never exceeds clean accuracy.

Each verdict is reported as ``{"name", "passed", "detail"}``; a failed check is flagged in the
report, never hidden. "Not weaker" allows a tolerance of ``max(0.02, 1/n)`` (one sample, or two
points of accuracy) for random starts.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

LARGE_EPS = 0.5
NEAR_ZERO = 0.05
CURVE_STEPS = 20
FEW_STEPS, MANY_STEPS = 10, 50


def _make_attack(name, model, dataset=None, eps=None, **overrides):
    from .attacks import make_attack

    return make_attack(name, model, dataset=dataset, eps=eps, **overrides)


def pgd_eps_grid(eps: float) -> list[float]:
    """L-inf budgets for the accuracy-vs-eps curve: 0, eps/2, eps, 2 eps, 0.3 and 0.5 (capped)."""
    vals = {0.0, eps / 2, eps, 2 * eps, 0.3, LARGE_EPS}
    return sorted(round(v, 6) for v in vals if 0 <= v <= LARGE_EPS)


def _pgd(model, dataset, eps, steps, factory):
    # Madry et al.'s step size rule (2.5 eps / steps) keeps every budget reachable in ``steps``.
    return factory("pgd", model, dataset=dataset, eps=eps, alpha=2.5 * eps / steps, steps=steps)


def run_sanity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dataset: str | None,
               eps: float | None = None, device="cpu", *, batch_size: int = 250,
               tick: Callable[[float], None] = lambda n: None,
               cancelled: Callable[[], bool] = lambda: False,
               attack_factory=None) -> tuple[list[dict], list[float]]:
    """The checks plus the PGD accuracy curve over ``pgd_eps_grid(eps)``.

    x: (N, C, H, W) in [0, 1]; y: (N,). eps: the L-inf budget of the evaluation (default: the
    dataset's PGD budget). ``attack_factory`` replaces ``attacks.make_attack`` (tests use it to
    plant a broken attack). Returns ``(checks, curve)``.
    """
    from .evaluation import accuracy, run_batched, set_eval

    factory = attack_factory or _make_attack
    if eps is None:
        from .attacks import default_params

        eps = float(default_params("pgd", dataset)["eps"])
    dev = torch.device(device)
    model = set_eval(model.to(dev))
    n = len(x)
    tol = max(0.02, 1.0 / max(n, 1))

    def acc_under(attack) -> float:
        x_adv = run_batched(attack, x, y, batch_size=batch_size, device=dev, tick=tick,
                            cancelled=cancelled)
        return accuracy(model, x_adv, y, batch_size)

    clean = accuracy(model, x, y, batch_size)
    a_fgsm = acc_under(factory("fgsm", model, dataset=dataset, eps=eps))
    a_bim = acc_under(factory("bim", model, dataset=dataset, eps=eps, alpha=eps / 10, steps=10))
    a_few = acc_under(_pgd(model, dataset, eps, FEW_STEPS, factory))
    a_many = acc_under(_pgd(model, dataset, eps, MANY_STEPS, factory))
    grid = pgd_eps_grid(eps)
    curve = []
    for e in grid:
        if e == 0:
            curve.append(clean)  # a zero budget leaves every input unchanged
            tick(n)
        else:
            curve.append(acc_under(_pgd(model, dataset, e, CURVE_STEPS, factory)))

    def fmt(v):
        return f"{v:.3f}"

    checks = [
        {"name": "bim_not_weaker_than_fgsm", "passed": a_bim <= a_fgsm + tol,
         "detail": f"eps={eps:g}: BIM(10 steps) accuracy {fmt(a_bim)} vs FGSM {fmt(a_fgsm)} "
                   f"(tolerance {tol:.3f})"},
        {"name": "pgd_not_weaker_than_fgsm", "passed": a_few <= a_fgsm + tol,
         "detail": f"eps={eps:g}: PGD({FEW_STEPS} steps) accuracy {fmt(a_few)} vs FGSM "
                   f"{fmt(a_fgsm)} (tolerance {tol:.3f})"},
        {"name": "more_pgd_steps_not_weaker", "passed": a_many <= a_few + tol,
         "detail": f"eps={eps:g}: PGD({MANY_STEPS} steps) accuracy {fmt(a_many)} vs "
                   f"PGD({FEW_STEPS} steps) {fmt(a_few)} (tolerance {tol:.3f})"},
    ]
    rises = [(grid[i], grid[i + 1]) for i in range(len(grid) - 1) if curve[i + 1] > curve[i] + tol]
    checks.append({
        "name": "accuracy_non_increasing_in_eps", "passed": not rises,
        "detail": "PGD accuracy over eps " + ", ".join(f"{e:g}: {fmt(a)}" for e, a in zip(grid, curve))
                  + ("" if not rises else "; rises between " + ", ".join(f"{a:g}->{b:g}" for a, b in rises)),
    })
    checks.append({
        "name": "near_zero_at_large_eps", "passed": curve[-1] <= NEAR_ZERO,
        "detail": f"PGD({CURVE_STEPS} steps) accuracy {fmt(curve[-1])} at eps={grid[-1]:g} "
                  f"(must be <= {NEAR_ZERO}); if not, the attack or its gradients are broken",
    })
    robust = {"fgsm": a_fgsm, "bim": a_bim, f"pgd{FEW_STEPS}": a_few, f"pgd{MANY_STEPS}": a_many}
    robust.update({f"pgd@{e:g}": a for e, a in zip(grid, curve) if e > 0})
    above = {k: v for k, v in robust.items() if v > clean + tol}
    checks.append({
        "name": "robust_not_above_clean", "passed": not above,
        "detail": f"clean accuracy {fmt(clean)}; highest robust accuracy "
                  f"{fmt(max(robust.values()))}"
                  + ("" if not above else "; above clean: " + ", ".join(f"{k} {fmt(v)}" for k, v in above.items())),
    })
    return checks, curve


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dataset: str | None,
                  eps: float | None = None, device="cpu", **kwargs) -> list[dict]:
    """``[{"name", "passed", "detail"}]`` for ``model`` on (x, y); see the module docstring.

    ``kwargs`` go to ``run_sanity`` (batch_size, tick, cancelled, attack_factory).
    """
    return run_sanity(model, x, y, dataset, eps, device, **kwargs)[0]
