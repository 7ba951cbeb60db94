"""The attack classes' documented defaults, the edges of their parameter ranges, and the base
class's contract (batching, clamping, input checks), on an untrained model: no training needed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.attacks import (
    BIM,
    CW,
    FGSM,
    PGD,
    AttackParamError,
    default_params,
    make_attack,
)
from worker.engine.attacks.base import (
    Attack,
    check_choice,
    check_float,
    check_int,
    predict,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()


def _xy(n: int = 10):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_constructor_defaults_are_the_documented_ones():
    m = _model()
    assert FGSM(m).params() == {"eps": 8 / 255}
    assert BIM(m).params() == {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}
    assert PGD(m).params() == {"eps": 8 / 255, "alpha": 2 / 255, "steps": 40, "random_start": True,
                               "seed": 0}
    assert PGD(m, eps=0.2).alpha == pytest.approx(0.05) and BIM(m, eps=0.2).alpha == pytest.approx(0.05)
    assert CW(m).params() == {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01, "binary_search_steps": 1}
    assert {a.batch_size for a in (FGSM(m), BIM(m), PGD(m), CW(m))} == {250}
    assert default_params("bim", "digits") == {"eps": 0.1, "alpha": 0.025, "steps": 10}


@pytest.mark.parametrize("cls", [FGSM, BIM, PGD])
def test_linf_radius_range_is_closed(cls):
    m = _model()
    assert cls(m, eps=0.0).eps == 0.0 and cls(m, eps=1.0).eps == 1.0
    for bad in (-0.01, 1.01):
        with pytest.raises(AttackParamError):
            cls(m, eps=bad)


@pytest.mark.parametrize("cls", [BIM, PGD])
def test_step_size_and_steps_ranges(cls):
    m = _model()
    assert cls(m, alpha=1.0).alpha == 1.0 and cls(m, steps=1).steps == 1
    for kw in ({"alpha": 0.0}, {"alpha": -0.1}, {"alpha": 1.01}, {"steps": 0}):
        with pytest.raises(AttackParamError):
            cls(m, **kw)


def test_pgd_seed_and_random_start():
    m = _model()
    assert PGD(m, seed=None).seed is None and PGD(m, seed=0).seed == 0
    with pytest.raises(AttackParamError):
        PGD(m, seed=-1)
    x, y = _xy()
    # without its random start PGD is BIM: the same steps from the clean image
    pgd = PGD(m, eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    assert torch.allclose(pgd, BIM(m, eps=0.1, alpha=0.02, steps=5)(x, y), atol=1e-6)
    started = PGD(m, eps=0.1, alpha=0.02, steps=5)(x, y)
    assert not torch.allclose(started, pgd)


def test_fgsm_is_one_signed_step_of_eps():
    m = _model()
    x, y = _xy()
    x = x.clamp(0.2, 0.8)  # away from the box, so no pixel is clipped
    xr = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(m(xr), y).backward()
    want = x + 0.1 * xr.grad.sign()
    assert torch.allclose(FGSM(m, eps=0.1)(x, y), want, atol=1e-6)


class _Shift(Attack):
    """Adds ``delta`` and records the batches it was given."""

    def __init__(self, model, delta, **kw):
        super().__init__(model, **kw)
        self.delta, self.batches = delta, []

    def params(self):
        return {}

    def _run(self, x, y):
        self.batches.append(len(x))
        return x + self.delta


def test_the_base_class_batches_and_clamps_into_the_box():
    x, y = _xy(10)
    up = _Shift(_model(), 2.0, batch_size=4)
    out = up(x, y)
    assert up.batches == [4, 4, 2] and torch.equal(out, torch.ones_like(x))
    assert torch.equal(_Shift(_model(), -2.0)(x, y), torch.zeros_like(x))
    assert torch.equal(_Shift(_model(), 0.0, batch_size=3)(x.double(), y), x.double())
    with pytest.raises(AttackParamError):
        _Shift(_model(), 0.0, batch_size=0)
    assert _Shift(_model(), 0.0, batch_size=1).batch_size == 1


def test_inputs_are_checked_at_their_edges():
    atk = _Shift(_model(), 0.0)
    x, y = _xy(5)  # not 4: the images are 4 x 4, and the message must name the batch's size
    edge = x.clone()
    edge[0, 0, 0, 0], edge[1, 0, 0, 0] = 0.0, 1.0
    assert torch.equal(atk(edge, y), edge)  # 0 and 1 themselves are inside
    for bad_x in (x - 0.5, x + 0.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            atk(bad_x, y)
    with pytest.raises(ValueError, match="x must be"):
        atk((x * 255).long(), y)
    for bad_y in (y.float(), y.bool(), y[:, None], y[:3]):
        with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(5,\)"):
            atk(x, bad_y)
    on_meta = _Shift(_model().to("meta"), 0.0)
    with pytest.raises(ValueError, match="move one of them"):
        on_meta(x, y)
    no_params = _Shift(nn.Flatten(), 0.0)  # nothing to compare devices with
    assert torch.equal(no_params(x, y), x)


def test_predict_batches_and_handles_no_input():
    m = _model()
    x, _ = _xy(10)
    assert torch.equal(predict(m, x, batch_size=3), m(x).argmax(1))
    empty = predict(m, x[:0])
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_parameter_checks_at_their_bounds():
    assert check_float("v", 0.0, 0.0) == 0.0 and check_float("v", 1.0, hi=1.0) == 1.0
    for kw in ({"lo": 0.0, "lo_open": True}, {"hi": 0.0, "hi_open": True}):
        with pytest.raises(AttackParamError):
            check_float("v", 0.0, **kw)
    assert check_float("v", 0.5, 0.0, 1.0, lo_open=True, hi_open=True) == 0.5
    # the message states the bound as it is: open or closed
    with pytest.raises(AttackParamError, match="v must be <= 1.0"):
        check_float("v", 1.5, hi=1.0)
    with pytest.raises(AttackParamError, match="v must be < 1.0"):
        check_float("v", 1.0, hi=1.0, hi_open=True)
    with pytest.raises(AttackParamError, match="v must be > 0.0"):
        check_float("v", 0.0, lo=0.0, lo_open=True)
    for bad in (True, "1", float("inf"), float("nan"), -0.1, 1.1):
        with pytest.raises(AttackParamError):
            check_float("v", bad, 0.0, 1.0)
    assert check_int("n", 1, 1, 3) == 1 and check_int("n", 3, 1, 3) == 3
    for bad in (0, 4, True, 2.0):
        with pytest.raises(AttackParamError):
            check_int("n", bad, 1, 3)
    assert check_choice("t", "a", ("a", "b")) == "a"
    with pytest.raises(AttackParamError, match="t must be one of"):
        check_choice("t", "c", ("a", "b"))


def test_make_attack_applies_the_radius_to_linf_attacks_only():
    m = _model()
    assert make_attack("bim", m, "digits", eps=0.2).params() == {"eps": 0.2, "alpha": 0.05, "steps": 10}
    assert make_attack("pgd", m, None).params()["eps"] == pytest.approx(8 / 255)
    assert make_attack("pgd", m, "digits", eps=None).params()["eps"] == 0.1
    assert make_attack("jsma", m, "digits", eps=0.2).params() == default_params("jsma", "digits")
