"""FGSM: the fast gradient sign method (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing
Adversarial Examples", ICLR 2015, arXiv:1412.6572). One L-inf step of size ``eps`` along the sign
of the cross-entropy gradient: ``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)``.

The step is ``sign_steps.input_grad_sign``; the base class owns the model's mode, device and
batching.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import Attack, check_float
from .sign_steps import input_grad_sign, project


class FGSM(Attack):
    """L-inf FGSM. ``x``: (N, C, H, W) in [0, 1], ``y``: (N,) -> ``x_adv`` with
    ``|x_adv - x|_inf <= eps``."""

    name = "fgsm"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, *, batch_size: int = 250) -> None:
        super().__init__(model, batch_size=batch_size)
        self.eps = check_float("eps", eps, 0.0, 1.0)

    def params(self) -> dict:
        return {"eps": self.eps}

    def _run(self, x: Tensor, y: Tensor) -> Tensor:
        return project(x + self.eps * input_grad_sign(self.model, x, y), x, self.eps)
