"""PGD: projected gradient descent on the cross-entropy loss under an L-inf budget, from a
uniformly random start inside the ball (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep
Learning Models Resistant to Adversarial Attacks", ICLR 2018, arXiv:1706.06083).

The steps are ``sign_steps.iterate``. The random start, uniform in the ball then clipped to
[0, 1], draws from the global generator of ``x``'s device; the base class seeds that generator
with ``seed`` for the call and restores it afterwards, so results are reproducible and the
caller's random stream is untouched.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, check_bool, check_float, check_int
from .sign_steps import iterate


class PGD(Attack):
    """L-inf PGD with random start. ``x``: (N, C, H, W) in [0, 1], ``y``: (N,) -> ``x_adv`` with
    ``|x_adv - x|_inf <= eps``. ``alpha`` defaults to ``eps / 4``; ``seed=None`` uses the caller's
    random stream."""

    name = "pgd"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None,
                 steps: int = 40, random_start: bool = True, seed: int | None = 0, *,
                 batch_size: int = 250) -> None:
        super().__init__(model, batch_size=batch_size)
        self.eps = check_float("eps", eps, 0.0, 1.0)
        self.alpha = self.eps / 4 if alpha is None else check_float("alpha", alpha, 0.0, 1.0, lo_open=True)
        self.steps = check_int("steps", steps, lo=1)
        self.random_start = check_bool("random_start", random_start)
        self.seed = None if seed is None else check_int("seed", seed, lo=0)

    def params(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "steps": self.steps,
                "random_start": self.random_start, "seed": self.seed}

    def _run(self, x: Tensor, y: Tensor) -> Tensor:
        start = x
        if self.random_start:
            start = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0.0, 1.0)
        return iterate(self.model, x, y, start, eps=self.eps, alpha=self.alpha, steps=self.steps)
