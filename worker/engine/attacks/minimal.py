"""The minimal-perturbation protocol of the DARE paper's artifact: per sample, the smallest
perturbation that flips the label, so the examples sit on the original model's decision boundary.

- FGSM, BIM, PGD: the first L-inf radius on ``EPS_GRID`` at which the attack flips the label is
  kept per sample. The grid is searched in ascending order, vectorised over the batch: each radius
  is run only on the samples that have not flipped yet. The grid steps by 0.005 up to 0.2 (where
  minimal radii of undefended MNIST-like models lie), then by 0.02 to 0.5 and 0.05 to 1.0.
  BIM/PGD use their fixed_eps step counts with ``alpha = eps / 4``.
- C&W L2: binary search over ``c`` (``CW_BINARY_SEARCH_STEPS`` runs from ``c = 1``), keeping per
  sample the smallest-L2 adversarial example (C&W, section V).
- JSMA: its natural stop, the first iteration at which the target class is reached.

``success`` marks samples whose returned example is misclassified; the caller keeps only those.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import budgets
from .base import eval_mode, predict
from .bim import BIM
from .cw import CW
from .fgsm import FGSM
from .jsma import JSMA
from .pgd import PGD

EPS_GRID: tuple[float, ...] = tuple(
    [round(0.005 * i, 3) for i in range(1, 41)]          # 0.005 .. 0.2
    + [round(0.2 + 0.02 * i, 3) for i in range(1, 16)]   # 0.22 .. 0.5
    + [round(0.5 + 0.05 * i, 3) for i in range(1, 11)]   # 0.55 .. 1.0
)
CW_BINARY_SEARCH_STEPS = 5


def minimal_params(name: str) -> dict:
    """The hyperparameters of the minimal protocol for ``name`` (for report.json)."""
    if name == "fgsm":
        return {"eps_grid": [EPS_GRID[0], EPS_GRID[-1], len(EPS_GRID)]}
    if name in ("bim", "pgd"):
        p = dict(budgets.BIM if name == "bim" else budgets.PGD)
        return {"eps_grid": [EPS_GRID[0], EPS_GRID[-1], len(EPS_GRID)], "alpha": "eps/4", **p}
    if name == "cw":
        return {**budgets.CW, "binary_search_steps": CW_BINARY_SEARCH_STEPS}
    if name == "jsma":
        return dict(budgets.JSMA)
    raise ValueError(f"unknown attack {name!r}; expected one of fgsm, bim, pgd, cw, jsma")


def minimal_linf(name: str, model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 250,
                 grid: tuple[float, ...] = EPS_GRID) -> tuple[Tensor, Tensor, Tensor]:
    """Grid search of the smallest flipping L-inf radius for FGSM/BIM/PGD.

    ``x``: (N, C, H, W) in [0, 1], ``y``: (N,). Returns ``x_adv`` (N, C, H, W) (``x`` where no
    radius flips the label), ``success`` (N,) bool and ``eps`` (N,) float (inf where unsuccessful).
    """
    cls = {"fgsm": FGSM, "bim": BIM, "pgd": PGD}[name]
    extra = {"fgsm": {}, "bim": budgets.BIM, "pgd": budgets.PGD}[name]
    y = y.to(x.device)
    x_adv = x.detach().clone()
    eps = torch.full((x.shape[0],), float("inf"), device=x.device)
    todo = torch.arange(x.shape[0], device=x.device)
    with eval_mode(model):
        for e in grid:
            if todo.numel() == 0:
                break
            atk = cls(model, eps=e, batch_size=batch_size, **extra)
            adv = atk(x[todo], y[todo])
            flipped = predict(model, adv, batch_size) != y[todo]
            hit = todo[flipped]
            x_adv[hit] = adv[flipped]
            eps[hit] = e
            todo = todo[~flipped]
    return x_adv, torch.isfinite(eps), eps


def minimal_attack(name: str, model: nn.Module, x: Tensor, y: Tensor,
                   batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """Minimal-perturbation adversarial examples. ``x``: (N, C, H, W) in [0, 1], ``y``: (N,) ->
    ``(x_adv (N, C, H, W), success (N,) bool)``; ``success`` is ``model(x_adv).argmax(1) != y``."""
    if name in ("fgsm", "bim", "pgd"):
        x_adv, success, _ = minimal_linf(name, model, x, y, batch_size)
        return x_adv, success
    if name == "cw":
        atk = CW(model, **{**budgets.CW, "binary_search_steps": CW_BINARY_SEARCH_STEPS}, batch_size=batch_size)
    elif name == "jsma":
        atk = JSMA(model, **budgets.JSMA, batch_size=batch_size)
    else:
        raise ValueError(f"unknown attack {name!r}; expected one of fgsm, bim, pgd, cw, jsma")
    x_adv = atk(x, y)
    return x_adv, predict(model, x_adv, batch_size) != y.to(x.device)
