"""AutoAttack in the evaluation: the original implementation's numbers, its checks as verdicts.

Kept cheap: a tiny digits CNN, a dozen points, mostly the ``fast`` version (APGD-CE + APGD-T);
the cross-check against pyautoattack's own ``run_standard_evaluation`` uses the standard version.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from worker.engine.attacks.autoattack import run_autoattack
from worker.engine.config import EvaluationConfig, parse_config
from worker.engine.evaluation import evaluate, select_samples
from worker.engine.report import build_report
from worker.engine.report_html import render_html

from .test_evaluation import digits_and_model, tiny_cnn

pyautoattack = pytest.importorskip("pyautoattack")

EPS = 0.1


def _points(splits, n, seed=0):
    idx = select_samples(len(splits.x_test), n, seed)
    return splits.x_test[idx], splits.y_test[idx]


def _weaker(model: nn.Module) -> nn.Module:
    """A second model that differs from the first (noised weights): a stand-in hardened model."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def _report(ev):
    return build_report(config={}, versions={}, timings_s={"evaluate": 1.0}, evaluation=ev,
                        chosen="h", clean_drop_limit=0.1, slicing={}, mining={}, comparison=None)


def _direct(path, x, y, attacks=None, batch_size=8) -> float:
    """pyautoattack's own run_standard_evaluation on the model saved at ``path``."""
    m = tiny_cnn()
    m.load_state_dict(torch.load(path))
    aa = pyautoattack.AutoAttack(m.eval(), norm="Linf", eps=EPS, version="standard", seed=0)
    aa.verbose = False
    if attacks is not None:  # the fast subset of the standard instance
        aa.attacks_to_run = attacks
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return int((y_adv == y).sum()) / len(y)


def _saved(tmp_path):
    splits, model = digits_and_model()
    hardened = _weaker(model)
    torch.save(model.state_dict(), tmp_path / "original.pt")
    torch.save(hardened.state_dict(), tmp_path / "hardened.pt")
    return splits, model, hardened


def test_report_matches_pyautoattack_run_directly_on_a_saved_model(tmp_path):
    """Same points, same seed, same batch size: the report's robust accuracies are exactly those of
    pyautoattack's own run_standard_evaluation on the saved models (fast subset: APGD-CE, APGD-T)."""
    splits, model, hardened = _saved(tmp_path)
    cfg = EvaluationConfig(attacks=["autoattack"], n_samples=12, eps=EPS, batch_size=8,
                           autoattack={"version": "fast"})
    rep = _report(evaluate(model, {"h": hardened}, splits, cfg, seed=0))["attacks"]["autoattack"]
    x, y = _points(splits, 12, seed=0)
    assert rep["original_accuracy"] == _direct(tmp_path / "original.pt", x, y, ["apgd-ce", "apgd-t"])
    assert rep["adaptive_accuracy"] == _direct(tmp_path / "hardened.pt", x, y, ["apgd-ce", "apgd-t"])
    for who, key in (("original", "original_accuracy"), ("hardened", "adaptive_accuracy")):
        steps = list(rep["breakdown"][who].values())
        assert list(rep["breakdown"][who]) == ["clean", "apgd-ce", "apgd-t"]
        assert steps[-1] == rep[key]
        assert all(b <= a for a, b in zip(steps, steps[1:]))  # robust accuracy never rises


def test_standard_version_matches_pyautoattack_exactly(tmp_path):
    """The standard version (APGD-CE, APGD-T, FAB-T, Square) on a few points of the original."""
    splits, model, _ = _saved(tmp_path)
    cfg = EvaluationConfig(attacks=["autoattack"], n_samples=4, eps=EPS, batch_size=8,
                           adaptive=False)
    ev = evaluate(model, {"h": model}, splits, cfg, seed=0)
    rep = _report(ev)["attacks"]["autoattack"]
    x, y = _points(splits, 4, seed=0)
    assert rep["original_accuracy"] == _direct(tmp_path / "original.pt", x, y)
    assert list(rep["breakdown"]["original"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert rep["params"]["n_target_classes"] == 9 and rep["params"]["version"] == "standard"


def test_fast_version_in_the_report_json_and_html():
    splits, model = digits_and_model()
    cfg = EvaluationConfig(attacks=["fgsm", "autoattack"], n_samples=8, eps=EPS,
                           autoattack={"version": "fast"})
    ev = evaluate(model, {"h": _weaker(model)}, splits, cfg, seed=0)
    rep = _report(ev)
    aa = rep["attacks"]["autoattack"]
    assert aa["params"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert "APGD-CE + APGD-T" in aa["params"]["note"] and "weaker" in aa["params"]["note"]
    assert aa["n"] == rep["attacks"]["fgsm"]["n"] == 8  # the same points as the other attacks
    assert list(aa["breakdown"]["hardened"]) == ["clean", "apgd-ce", "apgd-t"]
    # AutoAttack is at least as strong as FGSM at the same budget on the same points
    assert aa["original_accuracy"] <= rep["attacks"]["fgsm"]["original_accuracy"]
    assert rep["timings_s"]["autoattack"] > 0 and rep["timings_s"]["evaluate"] == 1.0
    names = [c["name"] for c in rep["sanity_checks"]]
    for who in ("original", "h"):
        assert f"{who}: autoattack_output_is_logits" in names
        assert f"{who}: autoattack_no_zero_gradients" in names
    html = render_html(rep)
    tile = html.split('class="tile ')[1]
    assert "AutoAttack, fast" in tile
    assert f"{100 * aa['original_accuracy']:.1f}%" in tile
    assert 'data-table="autoattack"' in html and "after APGD-T" in html


def test_verdict_uses_autoattack_not_the_mean_of_the_attacks():
    rep = {"method": "h", "attacks": {
        "pgd": {"n": 100, "original_accuracy": 0.1, "transfer_er": 0.5, "adaptive_accuracy": 0.9},
        "autoattack": {"n": 100, "params": {"version": "standard"}, "original_accuracy": 0.1,
                       "transfer_er": 0.4, "adaptive_accuracy": 0.1}}}
    html = render_html(rep)
    # PGD alone would say RAISED (+80 points); AutoAttack says the hardened model is no better
    tile = html.split('class="tile ')[1]
    assert "AutoAttack robust accuracy" in tile and ">TIE<" in tile and "RAISED" not in tile
    rep["attacks"]["autoattack"]["adaptive_accuracy"] = 0.0  # 10% -> 0% at n=100: beyond noise
    assert ">LOWERED<" in render_html(rep).split('class="tile ')[1]
    rep["attacks"]["autoattack"]["adaptive_accuracy"] = 0.5
    assert ">RAISED<" in render_html(rep).split('class="tile ')[1]


class _Softmax(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).softmax(1)


class _Noisy(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x) + 0.5 * torch.randn(x.shape[0], 10)


class _Rounded(nn.Module):
    """Rounds its input first: the gradient is zero everywhere (gradient masking)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(torch.round(x))


@pytest.mark.parametrize("wrap, check", [
    (_Softmax, "autoattack_output_is_logits"),
    (_Noisy, "autoattack_output_not_randomised"),
    (_Rounded, "autoattack_no_zero_gradients"),
])
def test_autoattack_checks_fail_on_a_model_built_to_trip_them(wrap, check):
    splits, model = digits_and_model()
    x, y = _points(splits, 6)
    clean = {c["name"]: c for c in run_autoattack(model, x, y, eps=EPS, version="fast")["checks"]}
    assert clean[check]["passed"], clean[check]
    res = run_autoattack(wrap(model).eval(), x, y, eps=EPS, version="fast")
    got = {c["name"]: c for c in res["checks"]}
    assert got[check]["passed"] is False
    assert got[check]["detail"].startswith("pyautoattack: ")


def test_run_leaves_parameters_gradients_and_global_rng_alone():
    splits, model = digits_and_model()
    x, y = _points(splits, 5)
    state = torch.random.get_rng_state()
    flags = [p.requires_grad for p in model.parameters()]
    run_autoattack(model, x, y, eps=EPS, version="fast", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_stops_on_points_already_broken_and_skips_what_is_left():
    """At a budget that repaints the image APGD-CE breaks every point; APGD-T is not run."""
    splits, model = digits_and_model()
    x, y = _points(splits, 6)
    res = run_autoattack(model, x, y, eps=0.5, version="fast")
    assert res["breakdown"]["apgd-ce"] == 0.0 and res["skipped"] == ["apgd-t"]
    assert not res["robust"].any()
    assert (res["x_adv"] - x).abs().max() <= 0.5 + 1e-6


def test_minimal_protocol_does_not_run_autoattack():
    splits, model = digits_and_model()
    cfg = EvaluationConfig(protocol="minimal", attacks=["fgsm", "autoattack"], n_samples=6)
    ev = evaluate(model, {"h": _weaker(model)}, splits, cfg, seed=0)
    assert set(ev["attacks"]) == {"fgsm"}


def test_config_shape():
    assert EvaluationConfig().attacks[-1] == "autoattack"
    assert EvaluationConfig().autoattack.version == "standard"
    with pytest.raises(Exception, match="evaluation.autoattack.version"):
        parse_config({"evaluation": {"autoattack": {"version": "plus"}}})
