"""The L-inf sign-gradient step shared by FGSM, BIM and PGD.

One step moves ``x_adv`` by ``alpha`` along the sign of the cross-entropy gradient with respect
to the input, then projects back onto the L-inf ball of radius ``eps`` around the clean ``x`` and
onto [0, 1]. The loss is summed over the batch rather than averaged: the sign is the same, and a
summed loss keeps each point's gradient from being divided by the batch size, where tiny
gradients would underflow to zero and the result would depend on ``batch_size``.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so the model's
parameters and their ``.grad`` are never written (the contract in ``base``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def input_grad_sign(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    """``sign(grad_x CE(model(x_adv), y))``, same shape as ``x_adv``."""
    x_adv = x_adv.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad.sign()


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """``x_adv`` clipped to ``|x_adv - x|_inf <= eps`` and to [0, 1]."""
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)


def iterate(model: nn.Module, x: Tensor, y: Tensor, x_start: Tensor, *, eps: float, alpha: float,
            steps: int) -> Tensor:
    """``steps`` projected sign steps of size ``alpha`` from ``x_start`` (which lies in the ball)."""
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv = project(x_adv + alpha * input_grad_sign(model, x_adv, y), x, eps).detach()
    return x_adv
