"""evaluate() and the sanity checks on a tiny digits CNN (CPU, seconds)."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

from worker.engine.config import EvaluationConfig
from worker.engine.data import Splits
from worker.engine.errors import Cancelled
from worker.engine.evaluation import accuracy, evaluate, select_samples
from worker.engine.sanity import run_sanity, sanity_checks

from .tiny import trained_once

ALL = ["fgsm", "bim", "pgd", "cw", "jsma"]


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


@functools.lru_cache(maxsize=1)
def _digits_and_weights():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images.astype(np.float32) / 16.0)[:, None])
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    tr, va = slice(0, 1077), slice(1077, 1437)
    te = slice(1437, None)
    splits = Splits("digits", x[tr], y[tr], x[va], y[va], x[te], y[te], 10)

    def train():
        torch.manual_seed(0)
        m = tiny_cnn()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            p = torch.randperm(len(splits.x_train), generator=g)
            for i in range(0, len(p), 64):
                b = p[i:i + 64]
                loss = nn.functional.cross_entropy(m(splits.x_train[b]), splits.y_train[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return copy.deepcopy(m.eval().state_dict())

    return splits, trained_once("evaluation-cnn", train)


def digits_and_model() -> tuple[Splits, nn.Module]:
    """The digits splits (60/20/20) and a freshly loaded copy of the trained tiny CNN."""
    splits, state = _digits_and_weights()
    m = tiny_cnn()
    m.load_state_dict(state)
    return splits, m.eval()


@pytest.fixture(scope="module")
def trained():
    return digits_and_model()


def test_tiny_cnn_is_a_reasonable_subject(trained):
    splits, m = trained
    assert accuracy(m, splits.x_test, splits.y_test) > 0.9


@pytest.fixture(scope="module")
def fixed_result(trained):
    splits, m = trained
    hardened = {"copy": copy.deepcopy(m), "noisy": _perturbed(m, 0.02)}
    seen = []
    res = evaluate(m, hardened, splits, EvaluationConfig(n_samples=60, attacks=ALL), seed=0,
                   progress=seen.append)
    return res, seen


def _perturbed(m: nn.Module, scale: float) -> nn.Module:
    c = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return c


def test_fixed_eps_result_has_the_contract_keys(fixed_result):
    res, seen = fixed_result
    assert set(res) >= {"protocol", "eps", "n_samples", "clean", "attacks", "sanity_checks", "pgd_curve"}
    assert res["protocol"] == "fixed_eps" and res["n_samples"] == 60
    assert set(res["clean"]) == {"original", "copy", "noisy"}
    assert list(res["attacks"]) == ALL
    for name, a in res["attacks"].items():
        assert set(a) - {"changed_predictions", "l2_perturbation"} == {"params", "n", "original_accuracy", "per_model"}
        assert a["n"] == 60 and a["params"]
        assert set(a["per_model"]) == {"copy", "noisy"}
        for pm in a["per_model"].values():
            assert set(pm) - {"l2_perturbation"} == {"transfer_er", "adaptive_accuracy"}
            assert 0 <= pm["transfer_er"] <= 1 and 0 <= pm["adaptive_accuracy"] <= 1
        assert 0 <= a["original_accuracy"] <= 1
    # eps unset: the dataset's stated budget (attacks/budgets.py: 0.1 on digits) for every L-inf
    # attack, not whatever the result says it was
    assert res["eps"] == 0.1
    for name in ("fgsm", "bim", "pgd"):
        assert res["attacks"][name]["params"]["eps"] == 0.1, name
    curve = res["pgd_curve"]
    assert set(curve) == {"eps", "original", "copy", "noisy"}
    assert all(len(v) == len(curve["eps"]) for v in curve.values())
    assert {c["name"].split(":")[0] for c in res["sanity_checks"]} == {"original", "copy", "noisy"}
    # progress is monotone, in [0, 1], and ends at 1
    assert seen and seen == sorted(seen) and 0 <= seen[0] and seen[-1] == 1.0


def test_an_identical_copy_scores_exactly_like_the_original(fixed_result):
    """Transfer and adaptive attacks on an unchanged copy are the original's own attack, seeded."""
    res, _ = fixed_result
    for a in res["attacks"].values():
        pm = a["per_model"]["copy"]
        assert pm["transfer_er"] == a["original_accuracy"]
        assert pm["adaptive_accuracy"] == a["original_accuracy"]


def test_robust_accuracy_never_exceeds_clean_for_the_same_model(fixed_result):
    res, _ = fixed_result
    clean = res["clean_on_samples"]
    for a in res["attacks"].values():
        assert a["original_accuracy"] <= clean["original"]
        for k, pm in a["per_model"].items():
            assert pm["adaptive_accuracy"] <= clean[k]
    for k in clean:
        assert max(res["pgd_curve"][k][1:]) <= clean[k]


def test_the_attacks_actually_attack(fixed_result):
    res, _ = fixed_result
    clean = res["clean_on_samples"]["original"]
    for name, a in res["attacks"].items():
        # JSMA's gamma = 0.1 lets it change only 6 of the 64 digits pixels: weaker, but not nothing
        assert a["original_accuracy"] < clean - (0.05 if name == "jsma" else 0.2), name


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_robust_below_clean_over_budgets(trained, eps):
    """The property on its own, at several budgets, without the sanity checks evaluate() adds."""
    from worker.engine.attacks import make_attack
    from worker.engine.evaluation import attack_kwargs, run_batched

    splits, m = trained
    x, y = splits.x_test[:40], splits.y_test[:40]
    clean = accuracy(m, x, y)
    for name in ("fgsm", "bim", "pgd"):
        atk = make_attack(name, m, dataset="digits", **attack_kwargs(name, eps))
        x_adv = run_batched(atk, x, y, batch_size=16, device="cpu")
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert accuracy(m, x_adv, y) <= clean


def test_minimal_protocol_keeps_only_successful_examples(trained):
    splits, m = trained
    cfg = EvaluationConfig(protocol="minimal", n_samples=40, attacks=["fgsm", "cw"])
    res = evaluate(m, {"copy": copy.deepcopy(m), "noisy": _perturbed(m, 0.05)}, splits, cfg)
    assert res["protocol"] == "minimal" and res["eps"] is None
    for name, a in res["attacks"].items():
        assert 0 < a["n"] <= 40, name
        assert a["original_accuracy"] == 0.0
        assert a["params"]["threat_model"] == "minimal" and "adaptive_metric" in a["params"]
        # the original's own adversarial examples fool an identical copy too
        assert a["per_model"]["copy"]["transfer_er"] == 0.0
        # an unbounded minimal attack re-run against the copy succeeds as often as on the original
        assert a["per_model"]["copy"]["adaptive_accuracy"] <= 0.05
        assert 0 <= a["per_model"]["noisy"]["transfer_er"] <= 1


def test_adaptive_off_gives_null_adaptive_accuracy(trained):
    splits, m = trained
    res = evaluate(m, {"copy": copy.deepcopy(m)}, splits,
                   EvaluationConfig(n_samples=10, attacks=["fgsm"], adaptive=False))
    pm = res["attacks"]["fgsm"]["per_model"]["copy"]
    assert pm["adaptive_accuracy"] is None and pm["transfer_er"] == res["attacks"]["fgsm"]["original_accuracy"]


def test_samples_are_seeded_and_shared():
    a, b, c = select_samples(100, 10, 0), select_samples(100, 10, 0), select_samples(100, 10, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(select_samples(5, 10, 0)) == 5


def test_cancellation_raises(trained):
    splits, m = trained
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 3  # let a few batches run first

    with pytest.raises(Cancelled):
        evaluate(m, {"copy": copy.deepcopy(m)}, splits,
                 EvaluationConfig(n_samples=40, attacks=["fgsm", "pgd"], batch_size=10),
                 cancelled=cancelled)
    assert len(calls) == 4


def test_evaluate_works_on_an_exported_graph(trained):
    splits, m = trained
    g = torch.export.export(copy.deepcopy(m), (splits.x_test[:2],),
                            dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    res = evaluate(m, {"exported": g}, splits, EvaluationConfig(n_samples=20, attacks=["fgsm"]))
    a = res["attacks"]["fgsm"]
    assert a["per_model"]["exported"]["adaptive_accuracy"] == pytest.approx(a["original_accuracy"])


# ---------------------------------------------------------------- sanity checks


def _by_name(checks):
    return {c["name"]: c for c in checks}


def test_sanity_checks_pass_for_a_working_attack(trained):
    splits, m = trained
    checks, curve = run_sanity(m, splits.x_test[:60], splits.y_test[:60], "digits")
    assert all(set(c) == {"name", "passed", "detail"} for c in checks)
    failed = [c for c in checks if not c["passed"]]
    assert not failed, failed
    assert curve[0] == accuracy(m, splits.x_test[:60], splits.y_test[:60])
    assert curve[-1] <= 0.05


class _Identity:
    """A broken "attack" that ignores its budget (as if eps were 0)."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, x, y):
        return x.clone()

    def params(self):
        return {"eps": 0.0}


class _Helpful:
    """A broken "attack" with the gradient's sign flipped: it descends the loss."""

    def __init__(self, name, model, dataset=None, eps=None, **k):
        self.model, self.eps = model, eps

    def __call__(self, x, y):
        x = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        (g,) = torch.autograd.grad(loss, x)
        return (x - self.eps * g.sign()).clamp(0, 1).detach()

    def params(self):
        return {"eps": self.eps}


def test_sanity_flags_an_attack_that_does_nothing(trained):
    splits, m = trained
    checks = _by_name(sanity_checks(m, splits.x_test[:60], splits.y_test[:60], "digits", eps=0.1,
                                    attack_factory=_Identity))
    assert checks["near_zero_at_large_eps"]["passed"] is False
    assert "0.5" in checks["near_zero_at_large_eps"]["detail"]


def test_sanity_flags_an_attack_that_helps_the_model(trained):
    splits, m = trained
    weak = _perturbed(m, 0.08)  # some clean errors for the "attack" to repair
    x, y = splits.x_test[:60], splits.y_test[:60]
    assert accuracy(weak, x, y) <= 0.95
    checks = _by_name(sanity_checks(weak, x, y, "digits", eps=0.1, attack_factory=_Helpful))
    assert checks["robust_not_above_clean"]["passed"] is False
    assert checks["near_zero_at_large_eps"]["passed"] is False


def test_sanity_results_are_reused_across_protocols_only_for_the_same_setting(trained, monkeypatch):
    from worker.engine import sanity as sanity_mod

    splits, m = trained
    models = {"copy": copy.deepcopy(m)}
    first = evaluate(m, models, splits, EvaluationConfig(n_samples=30, attacks=["fgsm"]))
    calls = []
    real = sanity_mod.run_sanity
    monkeypatch.setattr(sanity_mod, "run_sanity", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = EvaluationConfig(protocol="minimal", n_samples=30, attacks=["fgsm"])
    again = evaluate(m, models, splits, cfg, reuse_sanity=first["sanity"])
    assert calls == [] and again["sanity_checks"] == first["sanity_checks"]
    # other points: the cached checks do not apply and are run afresh
    other = evaluate(m, models, splits, cfg, seed=1, reuse_sanity=first["sanity"])
    assert len(calls) == 2 and other["sanity"]["key"]["seed"] == 1
