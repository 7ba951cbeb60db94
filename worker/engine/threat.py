"""The job's threat model: one L-inf budget (and one C&W L2 radius), each with its source.

Every budget in the report says where it came from: the job's config (``evaluation.eps``,
``evaluation.cw_l2_radius``), the embedded dataset's stated budget (``attacks/budgets.py``), or,
for uploaded data without ``evaluation.eps``, a rule applied to the data itself:

    eps = max(8/255, 1.6 * q), q = the data's smallest non-zero step between intensity levels.

1.6 steps is the ``digits`` rule (0.1 on grey levels 1/16 apart, budgets.py): a budget below one
step cannot move a quantised pixel to another level, so an 8x8 ``.npz`` upload with levels 1/16
apart would otherwise get 8/255 = 0.031 and every L-inf attack would leave it untouched. For
8-bit images (q = 1/255) the rule gives the CIFAR-10 budget 8/255 unchanged.

The same budget is the one the hardening methods train against (``baselines`` take ``eps``).
"""
from __future__ import annotations

import torch

UPLOAD_STEPS = 1.6
MIN_STEP = 1e-6  # gaps below this are float noise, not a quantisation step
STEP_SAMPLE = 500  # images examined for the step (the levels of a dataset recur in every image)


def intensity_step(x: torch.Tensor) -> float | None:
    """The smallest non-zero gap between distinct intensity values of ``x`` (None: one value)."""
    vals = torch.unique(x[:STEP_SAMPLE].detach().flatten().double())
    gaps = vals[1:] - vals[:-1]
    gaps = gaps[gaps > MIN_STEP]
    return float(gaps.min()) if len(gaps) else None


def linf_budget(cfg_eps: float | None, dataset: str | None, x: torch.Tensor) -> dict:
    """``{"eps", "source", "intensity_step"}`` for the evaluation and the hardening methods."""
    from .attacks import budgets

    q = intensity_step(x)
    if cfg_eps is not None:
        return {"eps": float(cfg_eps), "source": "evaluation.eps in the job's config",
                "intensity_step": q}
    if dataset in budgets.LINF_EPS:
        return {"eps": budgets.LINF_EPS[dataset],
                "source": f"the {dataset} dataset's stated budget (worker/engine/attacks/budgets.py)",
                "intensity_step": q}
    base = budgets.DEFAULT_LINF_EPS
    if q is not None and UPLOAD_STEPS * q > base:
        eps = round(UPLOAD_STEPS * q, 6)
        return {"eps": eps, "intensity_step": q,
                "source": f"derived from the data: {UPLOAD_STEPS} x its smallest intensity step "
                          f"{q:.4g} (the digits rule; 8/255 would sit below one step)"}
    return {"eps": base, "intensity_step": q,
            "source": "the upload default 8/255 (CIFAR-10, Madry et al. 2018); the data's "
                      f"intensity step {'unknown' if q is None else f'{q:.4g}'} is finer"}


def budget_check(eps: float, q: float | None) -> dict:
    """Fails when the L-inf budget cannot move a pixel by one intensity level."""
    if q is None:
        return {"name": "linf_budget_not_below_intensity_step", "passed": True,
                "detail": "the data has a single intensity value; no step to compare with"}
    ok = eps >= q - 1e-9
    return {"name": "linf_budget_not_below_intensity_step", "passed": ok,
            "detail": f"L-inf eps {eps:g} vs the data's smallest intensity step {q:.4g}"
                      + ("" if ok else ": no pixel can reach another level, so the L-inf attacks "
                                       "cannot change the image; set evaluation.eps")}


def attacking_check(changed: dict[str, int]) -> dict:
    """Fails when no attack changed any prediction of the original model (the attacks are not
    attacking: a broken gradient, a budget too small, a wrong label convention)."""
    ok = any(v > 0 for v in changed.values())
    return {"name": "attacks_change_predictions", "passed": ok,
            "detail": "points whose prediction an attack changed: "
                      + ", ".join(f"{k} {v}" for k, v in changed.items())
                      + ("" if ok else "; no attack changed any prediction of the original model")}
