"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, arXiv:2003.01690) through the authors' own code, the
PyPI package ``pyautoattack`` (pinned in pyproject.toml).

Not torchattacks' ``AutoAttack`` (10 APGD iterations instead of 100) nor ART's (no FAB): the
number the field compares is the original's standard version, L-inf:

- ``standard``: APGD-CE (100 iterations, 1 restart), APGD-T (DLR-targeted, 100 iterations,
  ``n_target_classes`` targets), FAB-T (``n_target_classes`` targets), Square (5000 queries);
- ``fast``: APGD-CE then APGD-T only, with the same settings. Cheaper, weaker: it has no
  gradient-free attack, so gradient masking goes unnoticed; the report says so.

``n_target_classes = min(9, classes - 1)``: the original's 9 assumes at least 10 classes.

The driver below is the loop of ``AutoAttack.run_standard_evaluation`` (pyautoattack 0.2.0) with
the same attack objects, order, seeds and batches, so its robust accuracy is the original's
exactly (tests/engine/test_autoattack.py runs both and compares); it differs only in what it
keeps: the robust accuracy after each sub-attack (the original logs it and throws it away), the
verdicts of the original's checks (``pyautoattack.checks``, which only log a warning), a
cancellation poll between batches and progress ticks. Like the original, a sub-attack only
attacks the points still robust after the previous ones.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn

from .base import eval_mode, seeded

VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
}
VERSION_NOTES = {
    "standard": "AutoAttack standard version (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square",
    "fast": "AutoAttack reduced to APGD-CE + APGD-T (no FAB-T, no Square): cheaper but weaker than "
            "the standard version, and blind to gradient masking",
}
# The original's checks, by the name of their sanity verdict (see ``_Recorder``).
CHECKS = {
    "autoattack_output_not_randomised": "check_randomized",
    "autoattack_output_is_logits": "check_range_output",
    "autoattack_forward_not_dynamic": "check_dynamic",
    "autoattack_no_zero_gradients": "check_zero_gradients",
    "autoattack_square_not_stronger_than_white_box": "check_square_sr",
}


def package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("pyautoattack")
    except metadata.PackageNotFoundError:
        return None


class _Recorder:
    """Stands in for the ``logging.Logger`` that pyautoattack's checks warn through, so a warning
    becomes a verdict of this run instead of a log line in a worker's output. Per run, not a
    shared logger: two evaluations in one process must not see each other's warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, msg, *args, **kwargs) -> None:
        self.warnings.append(str(msg))

    def debug(self, *args, **kwargs) -> None:
        pass

    info = debug


def n_target_classes(n_classes: int) -> int:
    return max(1, min(9, n_classes - 1))


def attacks_for(version: str, n_classes: int) -> list[str]:
    """The sub-attacks run; APGD-T's targeted DLR loss needs at least 4 classes (the original
    warns and produces NaNs below that), so it is left out there."""
    names = list(VERSIONS[version])
    return [a for a in names if a != "apgd-t" or n_classes >= 4]


def make_autoattack(model: nn.Module, *, eps: float, n_classes: int, version: str, seed: int,
                    device, recorder: _Recorder):
    """pyautoattack's ``AutoAttack`` in its standard configuration, L-inf ``eps``, with the
    target count of ``n_target_classes`` and the sub-attacks of ``version``."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    aa.verbose = False
    aa.logger = aa.apgd.logger = aa.apgd_targeted.logger = recorder
    aa.apgd_targeted.n_target_classes = n_target_classes(n_classes)
    aa.fab.n_target_classes = n_target_classes(n_classes)
    aa.attacks_to_run = attacks_for(version, n_classes)
    return aa


def params(*, eps: float, version: str, seed: int, n_classes: int | None) -> dict:
    out = {"eps": eps, "norm": "Linf", "version": version, "seed": seed,
           "implementation": f"pyautoattack {package_version()} (Croce & Hein's code)",
           "note": VERSION_NOTES[version],
           "accuracy": "robust accuracy: clean-correct points that no sub-attack broke"}
    if n_classes is not None:
        out["attacks"] = attacks_for(version, n_classes)
        out["n_target_classes"] = n_target_classes(n_classes)
    return out


def _sub_attack(aa, name: str, x: Tensor, y: Tensor) -> Tensor:
    # The same calls, in the same order, as AutoAttack.run_standard_evaluation.
    if name == "apgd-ce":
        aa.apgd.loss = "ce"
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y)
    if name == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    if name == "fab-t":
        aa.fab.targeted = True
        aa.fab.n_restarts = 1
        aa.fab.seed = aa.get_seed()
        return aa.fab.perturb(x, y)
    if name == "square":
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack sub-attack {name!r}")


def _checks_before(aa, model: nn.Module, x: Tensor, y: Tensor, bs: int) -> tuple[int, list[dict]]:
    """The original's checks on the first batch, each with its own recorder; returns the number
    of classes (from the output's width) and the verdicts."""
    from pyautoattack import checks

    verdicts = []
    rec = _Recorder()
    checks.check_randomized(aa.get_logits, x[:bs], y[:bs], bs=bs, logger=rec)
    verdicts.append(_verdict("autoattack_output_not_randomised", rec,
                             "five forward passes on the same inputs give the same output"))
    rec = _Recorder()
    n_cls = checks.check_range_output(aa.get_logits, x[:bs], logger=rec)
    verdicts.append(_verdict("autoattack_output_is_logits", rec,
                             "the output is not a probability distribution (logits, as the "
                             "attacks' losses assume)"))
    # check_dynamic counts grad/backward calls in a module-level dict it never resets: reset it so
    # one model's count cannot flag the next.
    for k in checks.funcs:
        checks.funcs[k] = 0
    rec = _Recorder()
    checks.check_dynamic(model, x[:bs], False, logger=rec)
    verdicts.append(_verdict("autoattack_forward_not_dynamic", rec,
                             "the forward pass computes no gradients of its own"))
    return int(n_cls), verdicts


def _verdict(name: str, rec: _Recorder, ok_detail: str) -> dict:
    if rec.warnings:
        return {"name": name, "passed": False,
                "detail": "pyautoattack: " + "; ".join(dict.fromkeys(rec.warnings))}
    return {"name": name, "passed": True, "detail": f"pyautoattack: {ok_detail}"}


@torch.no_grad()
def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, version: str = "standard",
                   seed: int = 0, batch_size: int = 250, device="cpu",
                   tick: Callable[[float], None] = lambda n: None,
                   cancelled: Callable[[], bool] = lambda: False) -> dict:
    """AutoAttack against ``model`` on ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,).

    Returns ``{"robust": bool (N,), "x_adv": (N, C, H, W), "breakdown": {"clean", <sub-attack>:
    robust accuracy after it}, "skipped": [sub-attacks not run because no point was left],
    "checks": [{"name", "passed", "detail"}], "n_classes", "seconds"}`` on the CPU. ``tick(n)``
    reports progress in units of points (N in all); ``cancelled()`` is polled between batches
    and raises ``errors.Cancelled``. The global random state is restored afterwards.
    """
    from pyautoattack import checks

    from ..errors import Cancelled

    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; expected one of {', '.join(VERSIONS)}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    n = len(x)
    x_orig, y_orig = x.detach().cpu().float(), y.detach().cpu().long()
    x_adv = x_orig.clone()
    if n == 0:
        return {"robust": torch.zeros(0, dtype=torch.bool), "x_adv": x_adv, "breakdown": {},
                "skipped": [], "checks": [], "n_classes": None, "seconds": 0.0}
    # The attacks differentiate with respect to the input; FAB calls backward(), which would
    # also fill the parameters' .grad: freeze them for the run (and it is cheaper).
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    rec = _Recorder()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with eval_mode(model), seeded(seed, dev):
            x0, y0 = x_orig[:batch_size].to(dev), y_orig[:batch_size].to(dev)
            n_cls = int(model(x0).shape[-1])
            aa = make_autoattack(model, eps=eps, n_classes=n_cls, version=version, seed=seed,
                                 device=dev, recorder=rec)
            _, verdicts = _checks_before(aa, model, x0, y0, batch_size)

            robust = torch.zeros(n, dtype=torch.bool)
            for s in range(0, n, batch_size):
                out = aa.get_logits(x_orig[s:s + batch_size].to(dev)).max(1)[1].cpu()
                robust[s:s + batch_size] = out.eq(y_orig[s:s + batch_size])
            breakdown = {"clean": float(robust.sum()) / n}
            skipped = []
            per_attack = n / max(len(aa.attacks_to_run), 1)
            for name in aa.attacks_to_run:
                idx = torch.nonzero(robust, as_tuple=False).flatten()
                if len(idx) == 0:
                    skipped.append(name)
                    breakdown[name] = 0.0
                    tick(per_attack)
                    continue
                for s in range(0, len(idx), batch_size):
                    if cancelled():
                        raise Cancelled()
                    b = idx[s:s + batch_size]
                    xb, yb = x_orig[b].to(dev), y_orig[b].to(dev)
                    adv = _sub_attack(aa, name, xb, yb)
                    broken = ~yb.eq(aa.get_logits(adv).max(1)[1]).cpu()
                    robust[b[broken]] = False
                    x_adv[b[broken]] = adv[broken.to(adv.device)].detach().cpu()
                    tick(per_attack * len(b) / len(idx))
                breakdown[name] = float(robust.sum()) / n
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    zero = _Recorder()
    zero.warnings = [w for w in rec.warnings if "zero gradient" in w]
    verdicts.append(_verdict("autoattack_no_zero_gradients", zero,
                             "no point had an all-zero input gradient in APGD"))
    sq = _Recorder()
    # The original compares only the breakdown of the attacks it ran (skipped ones are absent).
    checks.check_square_sr({k: v for k, v in breakdown.items() if k not in skipped}, logger=sq)
    verdicts.append(_verdict(
        "autoattack_square_not_stronger_than_white_box", sq,
        "Square (black-box) broke at most 0.2% of the points the white-box attacks left robust"
        if "square" in breakdown and "square" not in skipped else
        "not applicable: Square did not run (fast version, or no point left)"))
    return {"robust": robust, "x_adv": x_adv, "breakdown": breakdown, "skipped": skipped,
            "checks": verdicts, "n_classes": n_cls, "seconds": time.perf_counter() - t0}
