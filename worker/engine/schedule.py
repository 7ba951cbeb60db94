"""The time budget of ``compare`` (``budget_minutes``): estimate, order cheapest-first, skip.

Each estimate comes from one timed batch: ``Probe.step`` times one training step (forward,
backward, Adam) of the model on a batch, ``Probe.attack`` one attack batch against the original;
a method's ``cost`` (``methods.MethodSpec``) scales those to its trainings, and ``scoring_cost``
adds what every method pays alike: its grid points scored on the selection split and its share
of the final evaluation on the test points. Estimates are rough (attacks stop early on broken
points); the report states each beside the seconds it took.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import SANITY_MAX_SAMPLES, attack_kwargs, run_batched, set_eval

PROBE_POINTS = 16  # an attack batch this size is timed and scaled linearly


class Probe:
    """Timings of single batches on the job's model and data, each measured once."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, dataset: str | None,
                 eps: float, device, aa_version: str = "standard", seed: int = 0) -> None:
        self.model, self.x, self.y = model, x, y
        self.dataset, self.eps, self.device = dataset, eps, torch.device(device)
        self.aa_version, self.seed = aa_version, seed
        self._memo: dict = {}

    def step(self, batch_size: int) -> float:
        """Seconds of one training step on ``batch_size`` points."""
        key = ("step", batch_size)
        if key not in self._memo:
            m = set_eval(copy.deepcopy(self.model).to(self.device))
            params = [p for p in m.parameters()]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=1e-9)
            xb, yb = self._batch(batch_size)

            def one():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(xb), yb).backward()
                opt.step()

            one()  # the first call pays one-off costs (allocation, kernel choice)
            t0 = time.perf_counter()
            one()
            self._memo[key] = time.perf_counter() - t0
        return self._memo[key]

    def attack(self, name: str, n: int, **overrides) -> float:
        """Seconds to run attack ``name`` on ``n`` points, scaled from one batch."""
        key = ("attack", name, tuple(sorted(overrides.items())))
        if key not in self._memo:
            xb, yb = self._batch(PROBE_POINTS)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                t0 = time.perf_counter()
                if name == "autoattack":
                    from .attacks import autoattack as aa

                    aa.run_autoattack(self.model, xb.cpu(), yb.cpu(), eps=self.eps,
                                      version=self.aa_version, seed=self.seed,
                                      batch_size=PROBE_POINTS, device=self.device)
                else:
                    from .attacks import make_attack

                    atk = make_attack(name, self.model, dataset=self.dataset,
                                      **{**attack_kwargs(name, self.eps), **overrides})
                    run_batched(atk, xb, yb, batch_size=PROBE_POINTS, device=self.device)
                self._memo[key] = (time.perf_counter() - t0) / len(xb)
        return self._memo[key] * n

    def _batch(self, n: int):
        reps = -(-n // len(self.x))
        x = self.x.repeat(reps, *[1] * (self.x.dim() - 1))[:n]
        y = self.y.repeat(reps)[:n]
        return x.to(self.device), y.to(self.device)


def scoring_cost(probe: Probe, *, scored_points: int, n_val: int, final_attack: str,
                 eval_attacks: list[str], n_test: int, adaptive: bool) -> tuple[float, float]:
    """What a method pays besides training, ``(while it trains, at the end)``: PGD on the
    selection points per scored grid point; then the final attack on them and its evaluation on
    the test points (the adaptive re-runs and the sanity checks' PGD and FGSM runs)."""
    during = scored_points * probe.attack("pgd", n_val)
    after = probe.attack(final_attack, n_val) if final_attack != "pgd" else 0.0
    if adaptive:
        after += sum(probe.attack(a, n_test) for a in eval_attacks)
    return during, after + 10 * probe.attack("pgd", min(n_test, SANITY_MAX_SAMPLES))


def order(names: list[str], estimates: dict[str, float], needs: dict[str, tuple]) -> list[str]:
    """Cheapest first; a method that needs another comes after it."""
    out: list[str] = []
    pending = sorted(names, key=lambda n: (estimates.get(n, 0.0), names.index(n)))
    while pending:
        ready = next((n for n in pending if all(d in out or d not in names for d in needs.get(n, ()))),
                     pending[0])
        out.append(ready)
        pending.remove(ready)
    return out


class Budget:
    """Wall-clock bound on the stage: a method starts only if its estimate fits in what is left
    after the end-of-stage scoring already promised to the methods that ran."""

    def __init__(self, minutes: float | None, clock: Callable[[], float] = time.perf_counter,
                 start: float | None = None) -> None:
        self.limit = None if minutes is None else 60.0 * minutes
        self.clock, self.reserved = clock, 0.0
        self.start = clock() if start is None else start

    def elapsed(self) -> float:
        return self.clock() - self.start

    def fits(self, estimate_s: float, after_s: float) -> bool:
        return self.limit is None or self.elapsed() + self.reserved + estimate_s + after_s <= self.limit

    def reserve(self, after_s: float) -> None:
        self.reserved += after_s
