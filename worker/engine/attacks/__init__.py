"""Adversarial attacks for the evaluation report: FGSM, BIM, PGD (L-inf), C&W (L2), JSMA (L0).

Pure PyTorch. Every attack is an :class:`Attack`: ``attack(x, y) -> x_adv`` with ``x`` float
``(N, C, H, W)`` in [0, 1] and ``y`` int64 ``(N,)``; ``attack.params()`` gives the hyperparameters
for report.json. Two protocols (DESIGN.md, Evaluation):

- ``fixed_eps``: ``make_attack(name, model, dataset, eps=None, **overrides)`` with the budgets of
  :mod:`.budgets`;
- ``minimal``: ``minimal_attack(name, model, x, y)``, the paper artifact's per-sample minimal
  perturbation (see :mod:`.minimal`).
"""
from __future__ import annotations

import inspect

from torch import nn

from . import budgets
from .base import Attack, AttackParamError, eval_mode, predict
from .bim import BIM
from .cw import CW
from .fgsm import FGSM
from .jsma import JSMA
from .minimal import minimal_attack, minimal_linf, minimal_params
from .pgd import PGD

ATTACK_NAMES = ("fgsm", "bim", "pgd", "cw", "jsma")
ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "bim": BIM, "pgd": PGD, "cw": CW, "jsma": JSMA}

__all__ = ["ATTACK_NAMES", "ATTACKS", "Attack", "AttackParamError", "BIM", "CW", "FGSM", "JSMA", "PGD",
           "budgets", "default_params", "eval_mode", "make_attack", "minimal_attack", "minimal_linf",
           "minimal_params", "predict"]


def _check_name(name: object) -> str:
    if name not in ATTACKS:
        raise AttackParamError("name", f"unknown attack name {name!r}; expected one of {', '.join(ATTACK_NAMES)}")
    return name  # type: ignore[return-value]


def default_params(name: str, dataset: str | None) -> dict:
    """The fixed_eps hyperparameters of attack ``name`` for ``dataset`` (None or unknown: 8/255)."""
    name = _check_name(name)
    if name in budgets.LINF_ATTACKS:
        eps = budgets.linf_eps(dataset)
        if name == "fgsm":
            return {"eps": eps}
        steps = budgets.BIM if name == "bim" else budgets.PGD
        return {"eps": eps, "alpha": eps * budgets.ALPHA_FRACTION, **steps}
    return dict(budgets.CW if name == "cw" else budgets.JSMA)


def make_attack(name: str, model: nn.Module, dataset: str | None = None, eps: float | None = None,
                **overrides) -> Attack:
    """The fixed_eps attack ``name`` against ``model`` with ``dataset``'s defaults.

    ``eps`` overrides the L-inf radius of FGSM/BIM/PGD (and with it ``alpha = eps / 4`` unless
    ``alpha`` is overridden too); C&W and JSMA have no L-inf radius and ignore it. ``overrides``
    replace any other constructor parameter (including ``batch_size``); an unknown name raises
    AttackParamError (a ValueError) naming it, as does a bad value.
    """
    name = _check_name(name)
    cls = ATTACKS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    for key in overrides:
        if key not in allowed:
            raise AttackParamError(key, f"unknown parameter {key!r} for attack {name!r}; "
                                        f"expected one of {', '.join(allowed)}")
    params = default_params(name, dataset)
    if name in budgets.LINF_ATTACKS:
        radius = overrides.pop("eps", eps)
        if radius is not None:
            params["eps"] = radius
            if name != "fgsm":
                # a non-numeric radius is reported by the constructor, naming eps
                params["alpha"] = radius * budgets.ALPHA_FRACTION if isinstance(radius, (int, float)) else None
    params.update(overrides)
    return cls(model, **params)
