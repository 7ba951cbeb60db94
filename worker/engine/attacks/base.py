"""The bookkeeping every attack shares: input checks, eval mode, mini-batches, clamping.

Subclasses hold only the maths (``_run`` on one mini-batch). The base class guarantees the
contract the evaluation relies on:

- ``x``: float ``(N, C, H, W)`` in [0, 1], ``y``: int64 ``(N,)``; the result has ``x``'s shape,
  dtype and device, is detached and lies in [0, 1];
- the model is attacked in eval mode and its previous train/eval flags are restored exactly
  (per submodule), also when the attack raises;
- the model's parameters and their ``.grad`` are never written: attacks differentiate with
  ``torch.autograd.grad`` with respect to the input only;
- gradients are enabled inside the call, so callers may wrap evaluation in ``torch.no_grad()``.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from worker.engine.errors import InputError

__all__ = ["Attack", "AttackParamError", "eval_mode", "predict", "seeded"]


class AttackParamError(InputError):
    """A bad attack hyperparameter; ``param`` names it (the message does too)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__("invalid_attack_param", message,
                         "see worker/engine/attacks/budgets.py for the accepted parameters and defaults")
        self.param = param


# ---------------------------------------------------------------- parameter checks (ART style)

def check_float(name: str, value: object, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float inside the stated interval, else AttackParamError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise AttackParamError(name, f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise AttackParamError(name, f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise AttackParamError(name, f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise AttackParamError(name, f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise AttackParamError(name, f"{name} must be an integer, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        raise AttackParamError(name, f"{name} must be >= {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise AttackParamError(name, f"{name} must be <= {hi}, got {value!r}")
    return v


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise AttackParamError(name, f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise AttackParamError(name, f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


# ---------------------------------------------------------------- model mode and RNG helpers

@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore every submodule's ``training`` flag afterwards.

    A GraphModule from ``torch.export(...).module()`` refuses ``eval()`` (NotImplementedError):
    its train/eval behaviour was fixed when it was exported, so there is nothing to switch and
    nothing to restore.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
    except NotImplementedError:
        pass
    try:
        yield model
    finally:
        for m, flag in saved:
            if m.training != flag:
                m.training = flag


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNG of ``device`` (and the CPU's) for the block, then restore both.

    PGD's random start draws from the global generators, so this is how it becomes reproducible
    without disturbing the caller's random stream.
    """
    if seed is None:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 250) -> Tensor:
    """Arg-max labels ``(N,)`` of ``model`` on ``x`` ``(N, C, H, W)``, in eval mode, batched."""
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    with eval_mode(model):
        return torch.cat([model(x[s:s + batch_size]).argmax(1) for s in range(0, x.shape[0], batch_size)])


# ---------------------------------------------------------------- the base class

class Attack:
    """An adversarial attack on a classifier returning logits.

    ``attack(x, y) -> x_adv`` with ``x``: float ``(N, C, H, W)`` in [0, 1], ``y``: int64 ``(N,)``;
    ``x_adv``: same shape, dtype and device as ``x``, detached, in [0, 1]. The work runs on ``x``'s
    device in mini-batches of ``batch_size``. ``params()`` gives the JSON-serialisable
    hyperparameters (what goes into report.json); ``make_attack(name, model, **params())``
    rebuilds the same attack.
    """

    name: str = "attack"
    seed: int | None = None  # subclasses that draw random numbers set it

    def __init__(self, model: nn.Module, *, batch_size: int = 250) -> None:
        if not isinstance(model, nn.Module):
            raise AttackParamError("model", f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.batch_size = check_int("batch_size", batch_size, lo=1)

    def params(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    # -- subclasses implement these
    def _run(self, x: Tensor, y: Tensor, *extra: Tensor) -> Tensor:
        """One mini-batch: ``x`` (B, C, H, W), ``y`` (B,), plus the slices of ``_per_sample``'s
        tensors. The model is already in eval mode and gradients are enabled."""
        raise NotImplementedError

    def _per_sample(self, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """Per-sample tensors drawn once for the whole call (e.g. JSMA's target classes), so the
        result does not depend on ``batch_size``."""
        return ()

    # -- the shared driver
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = self._check_inputs(x, y)
        if x.shape[0] == 0:
            return x.clone()
        out = []
        with eval_mode(self.model), torch.enable_grad(), seeded(self.seed, x.device):
            extra = self._per_sample(x, y)
            for s in range(0, x.shape[0], self.batch_size):
                e = slice(s, s + self.batch_size)
                out.append(self._run(x[e], y[e], *(t[e] for t in extra)).detach())
        return torch.cat(out).to(dtype=x.dtype).clamp_(0.0, 1.0)

    def _check_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor of shape (N, C, H, W), got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] \
                or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},), got "
                             f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"x must lie in [0, 1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
        p = next(iter(self.model.parameters()), None)
        if p is not None and p.device != x.device:
            raise ValueError(f"x is on {x.device} but the model is on {p.device}; move one of them")
        # detach + clone: an inference-mode or grad-carrying input must not leak into the attack graph
        return x.detach().clone(), y.detach().to(device=x.device, dtype=torch.long).clone()
