"""TRADES, N-FGSM, AWP and dare_trades against their recipes (worker/engine/robust_training.py)."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.test_evaluation import digits_and_model
from worker.engine import robust_training as rt
from worker.engine.baselines import _fit
from worker.engine.config import RobustConfig, parse_config

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
    """Both ways in: fine_tune raises, and the registry entry says why before anything trains
    (compare lists it under skipped; a job that ships awp fails with method_unavailable)."""
    from types import SimpleNamespace

    from worker.engine.methods import REGISTRY

    splits, m = trained
    x, y = _batch(splits, 32)
    with pytest.raises(rt.MethodUnavailable) as e:
        rt.fine_tune(_BufferNet(), x, y, "awp", {"epochs": 1, "lr": 1e-3, "awp_base": "pgd"},
                     RobustConfig(), eps=EPS, ramp_epochs=0.0, batch_size=32)
    assert e.value.code == "method_unavailable" and "no weight" in e.value.reason
    assert "no weight" in REGISTRY["awp"].unavailable(SimpleNamespace(original=_BufferNet()))
    assert REGISTRY["awp"].unavailable(SimpleNamespace(original=m)) is None
    assert REGISTRY["trades"].unavailable(SimpleNamespace(original=_BufferNet())) is None


def test_the_comparison_lists_skipped_methods_with_their_reason():
    from worker.engine.report import build_comparison

    skipped = {"awp": {"reason": "method_unavailable", "detail": "no weight to perturb"},
               "at_pgd_online": {"reason": "time_budget", "detail": "does not fit in budget_minutes",
                                 "estimate_s": 90.0, "left_s": 12.0}}
    comp = build_comparison({"methods": {}}, 0.1, {"recommended": None, "rule": "r"}, skipped)
    assert comp["skipped"] == skipped and "skipped" not in comp["selection"]
    assert build_comparison({"methods": {}}, 0.1)["skipped"] == {}


# ------------------------------------------------------------------------------------ the registry

def test_the_methods_are_registry_entries_with_their_grid_in_selection():
    """TRADES' beta and AWP's base are grid parameters of the adversarial family (not robust's
    own lists): the family's defaults, overridable per method like any other list."""
    from worker.engine.methods import REGISTRY, compared, load_plugins
    from worker.engine.selection import grid_for

    load_plugins()
    for name, extra in (("trades", ["beta"]), ("nfgsm", []), ("awp", ["awp_base"]),
                        ("dare_trades", ["beta"])):
        spec = REGISTRY[name]
        assert spec.family == "adversarial" and list(spec.params) == extra and not spec.control
    assert REGISTRY["dare_trades"].needs == ("dare",)
    cfg = parse_config({"selection": {"overrides": {"trades": {"beta": [6]}}}})
    assert grid_for(REGISTRY["trades"], cfg) == {"epochs": [3, 5], "lr": [3e-4, 1e-3],
                                                 "beta": [6.0]}
    assert grid_for(REGISTRY["dare_trades"], cfg)["beta"] == [1.0, 6.0]
    assert grid_for(REGISTRY["awp"], cfg)["awp_base"] == ["pgd", "trades"]
    for gone in ({"robust": {"trades_beta_grid": [6]}}, {"robust": {"awp_bases": ["pgd"]}},
                 {"selection": {"adversarial": {"awp_base": ["sgd"]}}}):
        with pytest.raises(ValueError):
            parse_config(gone)
    # selectable in compare (bringing DARE along for dare_trades) and as a job's method
    assert compared(parse_config({"selection": {"methods": ["dare_trades", "nfgsm"]}})) == \
        ["dare", "dare_trades", "nfgsm"]
    # a job that ships dare_trades with compare: its model (and DARE's) ahead of the list
    assert compared(parse_config({"selection": {"methods": ["nfgsm"]}}), first=("dare_trades",)) \
        == ["dare", "dare_trades", "nfgsm"]
    assert parse_config({"method": "awp"}).method == "awp"


# ------------------------------------------------------------------------------------ the methods

def test_every_method_fine_tunes_from_the_uploads_weights_and_keeps_the_budget(trained):
    """One short run each: info names the recipe's settings; the model is changed from, and
    close to, the uploaded one (fine-tuning, not a fresh start); the input is untouched."""
    splits, m = trained
    before = copy.deepcopy(m.state_dict())
    xs, ys = splits.x_train[:128], splits.y_train[:128]
    rcfg = RobustConfig()
    for name, extra in (("trades", {"beta": 6.0}), ("nfgsm", {}), ("awp", {"awp_base": "pgd"}),
                        ("awp", {"awp_base": "trades"})):
        seen = []
        h, info = rt.fine_tune(m, xs, ys, name, {"epochs": 1, "lr": 1e-3, **extra}, rcfg,
                               eps=0.07, ramp_epochs=0.5, batch_size=64, dataset="digits",
                               on_epoch=lambda k, mm, seen=seen: seen.append(k))
        assert info["method"] == name and info["eps"] == 0.07 and seen == [1]
        assert info["eps_ramp_epochs"] == 0.5 and info["steps"] == 2
        assert "fine-tuned" in info["init"] and info["source"]
        w0, w1 = before["6.weight"], h.state_dict()["6.weight"]
        assert 0 < (w1 - w0).norm() < 0.2 * w0.norm(), name
        if name == "awp":
            assert info["gamma"] == {"pgd": 0.01, "trades": 0.005}[extra["awp_base"]]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------ through the stages

SMALL = {"baselines": {"epochs": 1, "max_train": 150, "lr_grid": [1e-3]}, "tune": {"epochs": 3},
         "evaluation": {"n_samples": 30, "attacks": ["pgd"]},
         "selection": {"dare": {"epochs": [2], "lr": [3e-3], "history_fraction": [0.5]},
                       "adversarial": {"epochs": [1, 2], "lr": [1e-3], "beta": [1.0, 6.0]},
                       "n_val": 60}}


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


def test_a_dare_trades_job_chooses_dare_then_trades_on_the_selection_split(lenet, tmp_path):
    """``method: dare_trades`` alone: the tune stage chooses DARE from its grid first (kept in
    state/), then TRADES' grid (beta x lr, scored at each epochs value) from DARE's chosen
    weights, judged against the upload's clean accuracy on validation points DARE did not mine."""
    from safetensors.torch import load_file

    from worker.engine.stages import run_stage

    ctx = _ctx(tmp_path, lenet, {**SMALL, "method": "dare_trades"})
    for name in ("validate", "slice", "mine"):
        summary = run_stage(name, ctx)
    assert summary["pool"] == "validation less the selection points"
    tuned = run_stage("tune", ctx)
    assert tuned["method"] == "dare_trades"
    assert {(r["beta"], r["epochs"]) for r in tuned["grid"]} == {(1.0, 1), (1.0, 2), (6.0, 1),
                                                                 (6.0, 2)}
    assert tuned["training"]["init"].startswith("DARE's chosen model")
    dare = load_file(str(tmp_path / "state" / "method_dare.safetensors"))
    out = load_file(str(tmp_path / "state" / "tuned.safetensors"))
    assert any(not torch.equal(out[k], dare[k]) for k in dare)
    dare_info = json.loads((tmp_path / "state" / "method_dare.json").read_text())
    # both judged against the upload on the same selection points
    assert tuned["n_val"] == dare_info["n_val"] == 60
    assert tuned["chosen"]["within_budget"] is True


def test_trades_and_nfgsm_raise_pgd_robust_accuracy_on_digits(lenet, tmp_path):
    """End to end through the stage runner on a LeNet trained on digits, the job's own settings
    (``harden``: 5 epochs at lr 3e-3 on the 1078 training images, eps ramp over 2 epochs, TRADES'
    beta the grid's first, 1); PGD-40 at the digits budget 0.1 on 300 test points. Seeded
    figures: original 0.320; TRADES 0.447, N-FGSM 0.473."""
    from worker.engine.attacks import make_attack
    from worker.engine.evaluation import accuracy, run_batched
    from worker.engine.stages import harden, load_inputs

    ctx = _ctx(tmp_path, lenet, {"baselines": {"epochs": 5, "lr_grid": [3e-3]},
                                 "selection": {"adversarial": {"epochs": [5]}}})
    model, _, splits = load_inputs(ctx)
    x, y = splits.x_test[:300], splits.y_test[:300]

    def robust(m):
        return accuracy(m, run_batched(make_attack("pgd", m, dataset="digits"), x, y,
                                       batch_size=300, device="cpu"), y)

    orig = robust(model.gm)
    got = {}
    for name in ("trades", "nfgsm"):
        h, info = harden(ctx, name)
        assert info["eps_ramp_epochs"] == 2.0 and info["epochs"] == 5
        got[name] = robust(h)
    print("PGD robust accuracy", orig, got)
    assert all(v > orig + 0.1 for v in got.values()), (orig, got)
