"""Controls that show how much of a method's figure comes from merely changing the weights.

Minimal-perturbation adversarial examples sit on the original model's decision boundary, so the
paper's transfer ER rewards *any* change of weights: a model nudged at random also "resists"
examples crafted against its unchanged self. ``weight_noise_like`` is that nudge, with no data:
Gaussian noise on exactly the weights a method changed, scaled per tensor to the same L2 norm as
the method's change. A method whose figures the control matches has shown no more than that.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


@torch.no_grad()
def weight_noise_like(original: nn.Module, changed: nn.Module, *, seed: int = 0,
                      of: str = "dare") -> tuple[nn.Module, dict]:
    """A copy of ``original`` plus noise shaped like ``changed - original``: for each parameter,
    N(0, 1) on the elements ``changed`` moved, rescaled to the norm of that change. Buffers
    (BatchNorm statistics) stay the original's."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(original)
    moved = dict(changed.named_parameters())
    changed_norm2 = 0.0
    touched = 0
    for name, p in m.named_parameters():
        delta = moved[name].detach().to(p.device, p.dtype) - p
        support = delta != 0
        norm = float(delta.norm())
        if norm == 0.0:
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)
        noise = torch.where(support, noise, torch.zeros_like(noise))
        noise *= norm / float(noise.norm())
        p += noise
        changed_norm2 += norm ** 2
        touched += int(support.sum())
    return m, {"method": "weight_noise", "of": of, "seed": seed,
               "l2_norm": changed_norm2 ** 0.5, "weights_changed": touched,
               "recipe": f"Gaussian noise on the weights {of} changed, scaled per tensor to "
                         f"{of}'s change (no data)"}
