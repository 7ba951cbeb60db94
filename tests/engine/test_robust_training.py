"""TRADES, N-FGSM, AWP and dare_trades against their recipes (worker/engine/robust_training.py)."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.test_evaluation import digits_and_model
from worker.engine import robust_training as rt
from worker.engine.baselines import _fit
from worker.engine.config import BaselineConfig, RobustConfig, parse_config

EPS = 0.1


@pytest.fixture(scope="module")
def trained():
    return digits_and_model()


def _batch(splits, n=64):
    return splits.x_train[:n], splits.y_train[:n]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ eps ramp

def test_the_eps_ramp_is_linear_and_reaches_the_budget_at_the_stated_epoch():
    n = 100
    assert rt.ramp_eps(EPS, 0, 0, n, 2.0) == 0.0
    assert rt.ramp_eps(EPS, 0, 50, n, 2.0) == pytest.approx(EPS / 4)
    assert rt.ramp_eps(EPS, 1, 50, n, 2.0) == pytest.approx(0.75 * EPS)
    assert rt.ramp_eps(EPS, 1, 99, n, 2.0) < EPS
    assert rt.ramp_eps(EPS, 2, 0, n, 2.0) == pytest.approx(EPS)
    assert rt.ramp_eps(EPS, 4, 50, n, 2.0) == pytest.approx(EPS)  # stays at the budget
    assert rt.ramp_eps(EPS, 0, 0, n, 0.0) == EPS                   # no ramp
    # capped at half the epochs, so half the training runs at the full budget
    assert rt.effective_ramp(2.0, 5) == 2.0 and rt.effective_ramp(2.0, 2) == 1.0


def test_a_batch_loss_trains_at_the_ramped_radius(trained):
    """At the first batch the radius is 0 (the loss is plain CE on x); once the ramp is over it is
    the budget (TRADES' x' reaches the ball's surface)."""
    splits, m = trained
    x, y = _batch(splits)
    sched = rt._Schedule(EPS, len(splits.x_train), 2.0, seed=0)
    loss = rt.trades_batch_loss(sched, beta=6.0, steps=10)
    ce = F.cross_entropy(m(x), y).item()
    assert loss(m, x, y, (0, 0)).item() == pytest.approx(ce, abs=1e-6)
    assert loss(m, x, y, (2, 0)).item() > ce + 0.05
    eps, gen = sched((2, 0), x.device)
    xa = rt.trades_example(m, x, eps, steps=10, step_size=eps / 4, gen=gen)
    assert (xa - x).abs().max() == pytest.approx(EPS, abs=1e-6)
    eps_mid, _ = sched((1, len(splits.x_train) // 2), x.device)
    assert eps_mid == pytest.approx(0.75 * EPS, rel=1e-3)


# ------------------------------------------------------------------------------------ TRADES

def test_trades_loss_is_ce_plus_beta_times_kl_from_clean_to_adversarial(trained):
    splits, m = trained
    x, y = _batch(splits)
    xa = rt.trades_example(m, x, EPS, steps=5, step_size=EPS / 4, gen=_gen())
    with torch.no_grad():
        ce = F.cross_entropy(m(x), y)
        assert rt.trades_loss(m, x, xa, y, beta=0.0) == ce
        p = F.softmax(m(x), 1)
        q = F.softmax(m(xa), 1)
        kl = (p * (p.log() - q.log())).sum(1).mean()  # KL(f(x) || f(x')), this direction
        assert kl > 1e-3
        got = rt.trades_loss(m, x, xa, y, beta=6.0)
    assert got.item() == pytest.approx((ce + 6.0 * kl).item(), rel=1e-5)


def test_trades_example_starts_near_x_and_climbs_the_kl_inside_the_ball(trained):
    splits, m = trained
    x, _ = _batch(splits)
    start = rt.trades_example(m, x, EPS, steps=0, step_size=EPS / 4, gen=_gen())
    # the authors' start: x + 0.001 * N(0, 1), not a uniform draw from the ball
    assert (start - x).std().item() == pytest.approx(0.001, rel=0.1)
    xa = rt.trades_example(m, x, EPS, steps=10, step_size=EPS / 4, gen=_gen())
    assert (xa - x).abs().max() <= EPS + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1

    def kl(z):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(m(z), 1), F.softmax(m(x), 1), reduction="batchmean")

    assert kl(xa) > 20 * kl(start)


# ------------------------------------------------------------------------------------ N-FGSM

def test_nfgsm_steps_eps_from_the_noisy_point_and_never_projects(trained):
    splits, m = trained
    x, y = _batch(splits)
    xa = rt.nfgsm_example(m, x, y, EPS, noise=2.0, step=1.0, gen=_gen(3))
    assert xa.min() >= 0 and xa.max() <= 1
    dev = (xa - x).abs()
    # noise up to 2 eps plus a step of eps: far outside the eps-ball, as the paper prescribes
    assert dev.max() > 2 * EPS and dev.max() <= 3 * EPS + 1e-6
    assert (dev > EPS + 1e-6).float().mean() > 0.2
    # the same noise, redrawn: x' is the noisy point moved by exactly eps wherever [0, 1] allows
    eta = (torch.rand(x.shape, generator=_gen(3)) * 2 - 1) * 2 * EPS
    xn = (x + eta).clamp(0, 1)
    free = (xa > 0) & (xa < 1)
    assert torch.allclose((xa - xn).abs()[free], torch.full_like(xa[free], EPS), atol=1e-6)


def test_nfgsm_costs_about_one_extra_forward_backward(trained):
    """One gradient of the input per batch: the model is called twice (the FGSM gradient and
    the training loss), PGD-10 would call it eleven times."""
    splits, m = trained
    x, y = _batch(splits)
    calls = []
    h = m.register_forward_hook(lambda *a: calls.append(1))
    try:
        loss = rt.nfgsm_batch_loss(rt._Schedule(EPS, 100, 0.0, 0), 2.0, 1.0)
        loss(m, x, y, (0, 0))
    finally:
        h.remove()
    assert len(calls) == 2


# ------------------------------------------------------------------------------------ AWP

def test_awp_perturbation_is_gamma_times_each_weights_norm_along_the_ascent(trained):
    splits, m = trained
    m = copy.deepcopy(m)
    x, y = _batch(splits)
    loss = F.cross_entropy(m(x), y)
    pert = rt.weight_perturbation(m, loss, gamma=0.01)
    matrices = [p for p in m.parameters() if p.dim() > 1]
    assert len(pert) == len(matrices) and all(p.dim() > 1 for p, _ in pert)  # no bias, no BN
    for p, v in pert:
        assert v.norm().item() == pytest.approx(0.01 * p.norm().item(), rel=1e-4)
    with torch.no_grad():
        before = F.cross_entropy(m(x), y)
        for p, v in pert:
            p.add_(v)
        after = F.cross_entropy(m(x), y)
    assert after > before  # v climbs the loss


@pytest.mark.parametrize("base", ["pgd", "trades"])
def test_awp_takes_its_perturbation_back_out_after_every_step(trained, base):
    splits, m = trained
    m = copy.deepcopy(m)
    x, y = _batch(splits)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    rcfg = RobustConfig()
    sched = rt._Schedule(EPS, len(x), 0.0, 0)
    loss, restore = rt.awp_batch_loss(sched, base, rcfg, "digits")
    for p in m.parameters():
        p.requires_grad_(True)
    value = loss(m, x, y, (0, 0))
    moved = {k for k, v in m.state_dict().items() if not torch.equal(v, saved[k])}
    assert moved and all(m.state_dict()[k].dim() > 1 for k in moved)  # perturbed while stepping
    restore()
    for k, v in m.state_dict().items():
        assert torch.allclose(v, saved[k], atol=1e-6), k
    assert value.isfinite()
    # through the shared epoch loop with lr 0: every step perturbs and restores, nothing drifts
    loss, restore = rt.awp_batch_loss(sched, base, rcfg, "digits")
    fit = _fit(m, splits.x_train[:128], splits.y_train[:128], lr=0.0, epochs=2, batch_size=32,
               batch_loss=loss, after_step=restore)
    assert fit["steps"] == 8
    for k, v in m.state_dict().items():
        assert torch.allclose(v, saved[k], atol=1e-5), k


class _BufferNet(nn.Module):
    """A linear classifier whose weight is a buffer (as a graph constant would be)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(10, 64))
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def test_awp_refuses_a_model_without_weight_parameters(trained):
    splits, _ = trained
    with pytest.raises(rt.MethodUnavailable) as e:
        rt.awp(_BufferNet(), splits, BaselineConfig(epochs=1, max_train=10), RobustConfig())
    assert e.value.code == "method_unavailable" and "no weight" in e.value.reason


def test_the_comparison_lists_skipped_methods_with_their_reason():
    from worker.engine.report import build_comparison

    comp = build_comparison({"methods": {}, "skipped": {"awp": "no weight to perturb"}}, 0.1)
    assert comp["skipped"] == {"awp": "no weight to perturb"}
    assert "skipped" not in build_comparison({"methods": {}}, 0.1)


# ------------------------------------------------------------------------------------ the methods

def test_every_method_fine_tunes_from_the_uploads_weights_and_keeps_the_budget(trained):
    """One short run each: info names the recipe's settings; the model is changed from, and
    close to, the uploaded one (fine-tuning, not a fresh start); the input is untouched."""
    splits, m = trained
    before = copy.deepcopy(m.state_dict())
    cfg = BaselineConfig(epochs=1, lr_grid=[1e-3], max_train=128)
    rcfg = RobustConfig(trades_beta_grid=[6.0])
    for name in ("trades", "nfgsm", "awp"):
        h, info = getattr(rt, name)(m, splits, cfg, rcfg, eps=0.07, seed=0)
        assert info["method"] == name and info["eps"] == 0.07
        assert info["eps_ramp_epochs"] == 0.5 and info["chosen"]["steps"] == 2
        assert "fine-tuned" in info["init"]
        w0, w1 = before["6.weight"], h.state_dict()["6.weight"]
        assert 0 < (w1 - w0).norm() < 0.2 * w0.norm(), name
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    _, info = rt.awp(m, splits, cfg, rcfg, seed=0)
    assert {r["base"] for r in info["grid"]} == {"pgd", "trades"}
    assert info["gamma"] == {"pgd": 0.01, "trades": 0.005}


# ------------------------------------------------------------------------------------ through the stages

SMALL = {"baselines": {"epochs": 1, "max_train": 150, "lr_grid": [1e-3]},
         "robust": {"trades_beta_grid": [6.0]}, "tune": {"epochs": 3}}


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    from worker.engine.reference.train import train_reference

    out = tmp_path_factory.mktemp("lenet")
    train_reference("lenet", "digits", 10, out, seed=0)
    return out


def _ctx(tmp_path, subject, config):
    from worker.engine.stages import StageContext

    (tmp_path / "inputs").mkdir(parents=True)
    for f in ("model.pt2", "history.zip"):
        shutil.copyfile(subject / f, tmp_path / "inputs" / f)
    return StageContext(tmp_path, parse_config({"dataset": "digits", **config}))


def test_dare_trades_runs_dare_then_trades_from_dares_weights(lenet, tmp_path):
    """dare_trades differs from DARE (TRADES ran after it) and from TRADES alone, which sees the
    same seed, grid and data: the only difference left is DARE's starting weights."""
    from worker.engine.stages import harden, run_stage

    ctx = _ctx(tmp_path, lenet, SMALL)
    for name in ("validate", "slice", "mine"):
        run_stage(name, ctx)
    dare, _ = harden(ctx, "dare")
    alone, alone_info = harden(ctx, "trades")
    both, info = harden(ctx, "dare_trades")
    assert info["phases"] == ["dare", "trades"] and info["dare"]["steps"] > 0
    sd, sa, sb = dare.state_dict(), alone.state_dict(), both.state_dict()
    assert any(not torch.equal(sb[k], sd[k]) for k in sd)
    assert any(not torch.equal(sb[k], sa[k]) for k in sa)
    # the clean budget is the upload's, not DARE's
    assert info["original_val"] == alone_info["original_val"]


def test_trades_and_nfgsm_raise_pgd_robust_accuracy_on_digits(lenet, tmp_path):
    """End to end through the stage runner on a LeNet trained on digits, the default recipes
    (eps ramp over 2 epochs, beta grid {1, 6}), 5 epochs at lr 3e-3 on the 1078 training
    images; PGD-40 at the digits budget 0.1 on 300 test points. Seeded figures: original 0.320;
    TRADES 0.447, N-FGSM 0.473."""
    from worker.engine.attacks import make_attack
    from worker.engine.evaluation import accuracy, run_batched
    from worker.engine.stages import harden, load_inputs

    ctx = _ctx(tmp_path, lenet, {"baselines": {"epochs": 5, "lr_grid": [3e-3]}})
    model, _, splits = load_inputs(ctx)
    x, y = splits.x_test[:300], splits.y_test[:300]

    def robust(m):
        return accuracy(m, run_batched(make_attack("pgd", m, dataset="digits"), x, y,
                                       batch_size=300, device="cpu"), y)

    orig = robust(model.gm)
    got = {}
    for name in ("trades", "nfgsm"):
        h, info = harden(ctx, name)
        assert info["within_budget"] is True
        got[name] = robust(h)
    print("PGD robust accuracy", orig, got)
    assert all(v > orig + 0.1 for v in got.values()), (orig, got)
