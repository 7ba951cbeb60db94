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
"""
from __future__ import annotations

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
