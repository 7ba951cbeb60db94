"""C&W under fixed_eps is bounded: an example counts only within the stated L2 radius."""
from __future__ import annotations

import math

import pytest

from worker.engine.attacks import budgets
from worker.engine.config import EvaluationConfig, parse_config
from worker.engine.evaluation import evaluate
from worker.engine.report import build_report
from worker.engine.report_html import render_html

from .test_evaluation import digits_and_model


@pytest.mark.parametrize("dataset, shape, radius", [
    ("mnist5k", (1, 28, 28), 2.0),
    ("digits", (1, 8, 8), 2.0 * math.sqrt(64 / 784)),
    ("upload", (3, 32, 32), 0.5),
    ("upload", (1, 28, 28), 0.5 * math.sqrt(784 / 3072)),
])
def test_default_radius_per_dataset_names_its_source(dataset, shape, radius):
    r, source = budgets.cw_l2_radius(dataset, shape)
    assert r == pytest.approx(radius)
    assert ("Croce" in source) if dataset != "upload" else ("RobustBench" in source)


def _cw(radius=None, n=12):
    splits, model = digits_and_model()
    cfg = EvaluationConfig(attacks=["cw"], n_samples=n, cw_l2_radius=radius)
    ev = evaluate(model, {"h": model}, splits, cfg, seed=0)
    rep = build_report(config={}, versions={}, timings_s={}, evaluation=ev, chosen="h",
                       clean_drop_limit=0.1, slicing={}, mining={}, comparison=None)
    return ev, rep


def test_radius_decides_what_counts_as_broken():
    ev_unb, rep_unb = _cw(radius=1000.0)   # effectively unbounded: C&W breaks (almost) all
    ev_tiny, rep_tiny = _cw(radius=1e-6)   # nothing fits: every point is scored clean
    clean = ev_unb["clean_on_samples"]["original"]
    assert rep_tiny["attacks"]["cw"]["original_accuracy"] == clean
    assert rep_tiny["attacks"]["cw"]["adaptive_accuracy"] == ev_tiny["clean_on_samples"]["h"]
    assert rep_unb["attacks"]["cw"]["original_accuracy"] < clean
    stats = rep_unb["attacks"]["cw"]["l2_perturbation"]
    o = stats["original"]
    assert o["n_successful"] > 0 and o["q1"] <= o["median"] <= o["q3"]
    assert stats["hardened"]["n_successful"] > 0
    params = rep_unb["attacks"]["cw"]["params"]
    assert params["l2_radius"] == 1000.0 and "cw_l2_radius" in params["l2_radius_source"]
    # a radius between the quartiles splits the successful examples
    _, rep_mid = _cw(radius=o["median"])
    acc = rep_mid["attacks"]["cw"]["original_accuracy"]
    assert rep_unb["attacks"]["cw"]["original_accuracy"] < acc < clean
    assert "median L2" in render_html(rep_mid)


def test_default_radius_in_report_and_config_validation():
    _, rep = _cw(n=6)
    assert rep["attacks"]["cw"]["params"]["l2_radius"] == pytest.approx(2.0 * math.sqrt(64 / 784))
    with pytest.raises(Exception, match="cw_l2_radius"):
        parse_config({"evaluation": {"cw_l2_radius": -1}})
