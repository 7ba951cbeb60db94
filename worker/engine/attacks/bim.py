"""BIM: the basic iterative method, iterated FGSM (Kurakin, Goodfellow & Bengio, "Adversarial
Examples in the Physical World", ICLR workshop 2017, arXiv:1607.02533). ``steps`` sign steps of
size ``alpha`` from the clean image, each projected onto the L-inf ball of radius ``eps`` and [0, 1].
No random start (that is what distinguishes PGD).

The steps are ``sign_steps.iterate`` from the clean image.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import Attack, check_float, check_int
from .sign_steps import iterate


class BIM(Attack):
    """L-inf BIM. ``x``: (N, C, H, W) in [0, 1], ``y``: (N,) -> ``x_adv`` with
    ``|x_adv - x|_inf <= eps``. ``alpha`` defaults to ``eps / 4``."""

    name = "bim"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None,
                 steps: int = 10, *, batch_size: int = 250) -> None:
        super().__init__(model, batch_size=batch_size)
        self.eps = check_float("eps", eps, 0.0, 1.0)
        self.alpha = self.eps / 4 if alpha is None else check_float("alpha", alpha, 0.0, 1.0, lo_open=True)
        self.steps = check_int("steps", steps, lo=1)

    def params(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "steps": self.steps}

    def _run(self, x: Tensor, y: Tensor) -> Tensor:
        return iterate(self.model, x, y, x, eps=self.eps, alpha=self.alpha, steps=self.steps)
