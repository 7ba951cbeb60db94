"""C&W L2: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017,
arXiv:1608.04644 (the untargeted L2 attack, change of variables ``x_adv = (tanh(w) + 1) / 2``).

Per sample, minimise ``||x_adv - x||_2^2 + c * f(x_adv)`` with Adam over ``w``, where
``f(x') = max(Z(x')_y - max_{j != y} Z(x')_j, -kappa)`` on the logits ``Z``. Of all iterates that
are adversarial (arg-max != y and margin >= kappa) the one with the smallest L2 distance is kept;
a sample for which none is adversarial is returned unchanged (so it counts as robust).

``binary_search_steps = 1`` (the fixed_eps protocol) runs once with the stated ``c``. With more
steps, ``c`` is searched per sample as in the paper's code: after a success the upper bound drops
to ``c``, after a failure the lower bound rises to ``c``; the next ``c`` is the midpoint, or ten
times ``c`` while no upper bound is known. The smallest-L2 success over all runs is kept.

Written here rather than taken from torchattacks 3.5.1, whose CW (1) calls ``cost.backward()``,
which accumulates into the model's ``.grad``; (2) starts from ``w = atanh(2x - 1)``, which is
infinite for pixels at exactly 0 or 1, so those pixels (most of an MNIST image) can never move;
(3) takes the best "other" logit as ``max((1 - onehot) * Z)``, which is 0 instead of the best
other logit when all of them are negative; (4) has no search over ``c``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, check_float, check_int

# Carlini's code scales by this before atanh so that pixels at 0 or 1 get a finite w.
_TANH_SCALE = 1 - 1e-6


class CW(Attack):
    """Untargeted C&W L2. ``x``: (N, C, H, W) in [0, 1], ``y``: (N,) -> ``x_adv`` (N, C, H, W).

    ``c``: weight of the classification term (the initial constant when binary-searching);
    ``kappa``: required logit margin; ``steps``: Adam iterations per run; ``lr``: Adam's step
    size on ``w``; ``binary_search_steps``: runs over ``c`` (1 = fixed ``c``).
    """

    name = "cw"

    def __init__(self, model: nn.Module, c: float = 1.0, kappa: float = 0.0, steps: int = 100,
                 lr: float = 0.01, binary_search_steps: int = 1, *, batch_size: int = 250) -> None:
        super().__init__(model, batch_size=batch_size)
        self.c = check_float("c", c, 0.0, lo_open=True)
        self.kappa = check_float("kappa", kappa, 0.0)
        self.steps = check_int("steps", steps, lo=1)
        self.lr = check_float("lr", lr, 0.0, lo_open=True)
        self.binary_search_steps = check_int("binary_search_steps", binary_search_steps, lo=1)

    def params(self) -> dict:
        return {"c": self.c, "kappa": self.kappa, "steps": self.steps, "lr": self.lr,
                "binary_search_steps": self.binary_search_steps}

    def _run(self, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        c = torch.full((n,), self.c, device=x.device, dtype=x.dtype)
        lo = torch.zeros_like(c)
        hi = torch.full_like(c, float("inf"))
        best_l2 = torch.full_like(c, float("inf"))
        best = x.clone()
        for _ in range(self.binary_search_steps):
            adv, l2 = self._optimise(x, y, c)
            ok = torch.isfinite(l2)
            better = ok & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best[better] = adv[better]
            hi = torch.where(ok, torch.minimum(hi, c), hi)
            lo = torch.where(ok, lo, torch.maximum(lo, c))
            c = torch.where(torch.isfinite(hi), (lo + hi) / 2, c * 10)
        return best

    def _optimise(self, x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One Adam run with per-sample constants ``c`` (N,). Returns the smallest-L2 adversarial
        iterate per sample (x where none) and its squared L2 distance (inf where none)."""
        n = x.shape[0]
        w = torch.atanh((2 * x - 1) * _TANH_SCALE).detach().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.lr)
        best = x.clone()
        best_l2 = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        onehot = None
        for _ in range(self.steps):
            adv = (torch.tanh(w) + 1) / 2
            logits = self.model(adv)
            if onehot is None:
                onehot = nn.functional.one_hot(y, logits.shape[1]).bool()
            real = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.masked_fill(onehot, float("-inf")).amax(1)
            l2 = (adv - x).flatten(1).pow(2).sum(1)
            loss = (l2 + c * torch.clamp(real - other, min=-self.kappa)).sum()
            (grad,) = torch.autograd.grad(loss, w)
            with torch.no_grad():
                hit = (logits.argmax(1) != y) & (other - real >= self.kappa) & (l2 < best_l2)
                best_l2 = torch.where(hit, l2, best_l2)
                best[hit] = adv[hit]
            w.grad = grad
            opt.step()
        return best, best_l2
