"""Fixed-epsilon budgets and default hyperparameters of the five attacks, per dataset.

The L-inf radius is the one number that has to depend on the data, because it is measured in
pixel intensity and datasets quantise intensity differently:

- ``digits`` (scikit-learn, 8x8, 17 grey levels, step 1/16 = 0.0625): eps = 0.1 lets every pixel
  move by about 1.6 grey levels. A smaller radius would sit below one quantisation step for most
  pixels and say little; a larger one (0.3, Madry et al.'s MNIST budget) repaints a coarse 8x8
  digit and no longer preserves its class for a human.
- ``mnist5k`` (MNIST, 28x28, 256 levels): eps = 0.1, the moderate MNIST budget of the literature
  (0.1 to 0.3); undefended CNNs fall to near zero accuracy under PGD there, which leaves the room
  the report needs to show a hardening effect.
- ``fashion`` (Fashion-MNIST, 28x28, 256 levels): eps = 0.1, the same moderate budget as
  MNIST here (Fashion-MNIST robustness papers mostly use 0.1 to 0.2); same quantisation, and
  garments stay recognisable at 0.1.
- anything else (uploads): 8/255, the standard CIFAR-10 L-inf budget (Madry et al. 2018), a
  radius that is imperceptible on natural 8-bit images.

Step sizes: ``alpha = eps / 4`` for BIM (10 steps) and PGD (40 steps, random start), so both can
walk the whole ball and back; 40 PGD steps at eps/4 is enough for undefended models (Madry et al.
used 40 steps of 2.5 * eps / 40 on MNIST). C&W L2 and JSMA do not take an L-inf radius; they run
with stated parameters (C&W: c = 1, kappa = 0, 100 Adam steps of lr 0.1 — torchattacks'
default lr 0.01 leaves an MNIST LeNet at 76 % accuracy after 100 steps, lr 0.1 at 33 %, and a
weak attack would flatter every defence; JSMA: theta = +1, gamma = 0.1, as in Papernot et al. and
cleverhans/ART).

C&W L2 is an unbounded minimal-perturbation attack: under ``fixed_eps`` it would break every point
and its accuracy could not move. The evaluation bounds it (``l2_radius``): an adversarial example
counts only if its L2 distance to the clean image is within the radius.

- ``mnist5k`` (28x28x1): eps_2 = 2.0, the MNIST L2 budget of Croce & Hein (FAB, ICCV 2019, and
  AutoAttack, ICML 2020) and of the MNIST L2 evaluations that followed (Rony et al. 2019, DDN);
- ``digits`` (8x8x1): the MNIST radius scaled by the square root of the pixel-count ratio,
  2.0 * sqrt(64 / 784) = 0.571, so that the same per-pixel change gives the same L2 distance;
- anything else: eps_2 = 0.5, the CIFAR-10 L2 budget of RobustBench (Croce et al. 2021), scaled
  the same way from 32x32x3 = 3072 values to the upload's C*H*W.
"""
from __future__ import annotations

import math

LINF_EPS: dict[str, float] = {"digits": 0.1, "mnist5k": 0.1, "fashion": 0.1}
DEFAULT_LINF_EPS = 8 / 255
ALPHA_FRACTION = 0.25  # alpha = eps * ALPHA_FRACTION unless alpha is given
LINF_ATTACKS = ("fgsm", "bim", "pgd")

BIM = {"steps": 10}
PGD = {"steps": 40, "random_start": True, "seed": 0}
CW = {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.1, "binary_search_steps": 1}
JSMA = {"theta": 1.0, "gamma": 0.1, "target": "random", "seed": 0}


def linf_eps(dataset: str | None) -> float:
    """The fixed_eps L-inf radius for ``dataset`` (8/255 for unknown or uploaded data)."""
    return LINF_EPS.get(dataset or "", DEFAULT_LINF_EPS)


MNIST_L2, MNIST_DIM = 2.0, 28 * 28
CIFAR_L2, CIFAR_DIM = 0.5, 3 * 32 * 32


def cw_l2_radius(dataset: str | None, input_shape) -> tuple[float, str]:
    """The fixed_eps L2 radius of C&W for ``dataset`` with inputs of ``input_shape`` (C, H, W),
    and a sentence naming its source (for report.json)."""
    dim = math.prod(int(d) for d in input_shape)
    if dataset == "mnist5k":
        return MNIST_L2, "MNIST L2 budget 2.0 (Croce & Hein 2019/2020, FAB and AutoAttack)"
    if dataset == "fashion":  # same 28x28 grey images as MNIST
        return MNIST_L2, ("MNIST L2 budget 2.0 (Croce & Hein 2019/2020), kept for Fashion-MNIST's "
                          "28x28 grey images")
    if dataset == "digits":
        r = MNIST_L2 * math.sqrt(dim / MNIST_DIM)
        return r, (f"MNIST L2 budget 2.0 (Croce & Hein) scaled by sqrt({dim}/{MNIST_DIM}) to "
                   f"the 8x8 digits: {r:.3f}")
    r = CIFAR_L2 * math.sqrt(dim / CIFAR_DIM)
    return r, (f"RobustBench CIFAR-10 L2 budget 0.5 scaled by sqrt({dim}/{CIFAR_DIM}) to the "
               f"upload's {dim} input values: {r:.3f}")
