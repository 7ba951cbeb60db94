"""Wilson intervals on every accuracy; differences within them are ties, not "RAISED"."""
from __future__ import annotations

import re

import pytest

from worker.engine.report_html import pgd_chart, render_html, tick_rows
from worker.engine.stats import overlaps, wilson


def test_wilson_matches_the_textbook_values():
    # Brown, Cai & DasGupta (2001): the Wilson interval of 0/10 is [0, 0.278], of 5/10 [0.237, 0.763]
    assert wilson(0.0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(0.5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    lo, hi = wilson(0.47, 497)
    assert 0.42 < lo < 0.47 < hi < 0.52
    assert wilson(None, 10) is None and wilson(0.5, 0) is None
    assert overlaps([0.1, 0.3], [0.25, 0.4]) and not overlaps([0.1, 0.2], [0.3, 0.4])


def _report(before, after, n):
    return {"method": "dare", "attacks": {"autoattack": {
        "n": n, "params": {"version": "standard"}, "original_accuracy": before,
        "transfer_er": after, "adaptive_accuracy": after}}}


def test_one_point_at_n_497_is_a_tie_not_raised():
    html = render_html(_report(0.470, 0.481, 497))
    tile = html.split('class="tile ')[1]
    assert tile.startswith("na") and ">TIE<" in tile and "RAISED" not in tile
    assert "within the sampling noise" in html


def test_a_difference_beyond_the_intervals_is_raised():
    tile = render_html(_report(0.10, 0.40, 497)).split('class="tile ')[1]
    assert tile.startswith("good") and ">RAISED<" in tile


def test_bars_carry_their_interval_whiskers():
    html = render_html(_report(0.10, 0.40, 100))
    assert html.count('<g class="ci"') == 3  # original, transfer, adaptive of the one attack
    assert "95% interval" in html


def test_report_json_accuracies_carry_n_and_interval():
    from worker.engine.report import build_report

    ev = {"clean": {"original": 0.9, "h": 0.88}, "n_test": 360, "protocol": "fixed_eps",
          "attacks": {"pgd": {"params": {}, "n": 50, "original_accuracy": 0.1,
                              "per_model": {"h": {"transfer_er": 0.5, "adaptive_accuracy": 0.3}}}},
          "sanity_checks": []}
    rep = build_report(config={}, versions={}, timings_s={}, evaluation=ev, chosen="h",
                       clean_drop_limit=0.1, slicing={}, mining={}, comparison=None)
    ci = rep["attacks"]["pgd"]["ci95"]
    assert ci["adaptive_accuracy"] == wilson(0.3, 50) and ci["original_accuracy"] == wilson(0.1, 50)
    assert rep["clean_accuracy"]["n"] == 360
    assert rep["clean_accuracy"]["ci95"]["hardened"] == wilson(0.88, 360)


def test_close_epsilon_labels_do_not_overlap():
    # the hidden subject's grid: 0.0157 and 0.0275 sit 5 px apart on a 0.5-wide axis
    eps = [0.0, 0.0157, 0.0314, 0.0627, 0.3, 0.5]
    svg = pgd_chart({"eps": eps, "original": [0.9, 0.5, 0.3, 0.1, 0.0, 0.0]}, "dare", 0.0314)
    boxes = []
    for x, y, label in re.findall(r'<text x="([\d.]+)" y="([\d.]+)"[^>]*>([\d.]+)</text>', svg):
        half = len(label) * 6.5 / 2
        boxes.append((float(y), float(x) - half, float(x) + half))
    assert len(boxes) >= 4
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[0] != b[0] or a[2] <= b[1] or b[2] <= a[1], (a, b)
    assert tick_rows([0, 100, 105], ["0", "0.0157", "0.0275"]) == [0, 0, 1]


def test_comparison_marks_methods_within_the_intervals_as_ties():
    from worker.engine.report_html import comparison_section

    def m(v):
        return {"clean_accuracy": 0.9, "within_budget": True, "attacks": {},
                "mean_transfer_er": v, "mean_adaptive_accuracy": v}

    comp = {"methods": {"dare": m(0.47), "at_pgd": m(0.48), "at_fgsm": m(0.20)},
            "recommended": "at_pgd", "rule": "r"}
    html = comparison_section(comp, "dare", n=497)
    rows = {r.split("</td>")[0]: r for r in html.split("<tr")[2:]}
    assert "tie with the best" in next(r for k, r in rows.items() if ">dare" in k)
    assert "tie with the best" not in next(r for k, r in rows.items() if ">at_fgsm" in k)
    assert "tie with the best" not in comparison_section(comp, "dare", n=None)


def test_minimal_protocol_reports_perturbation_sizes_and_a_budget_curve():
    from worker.engine.config import EvaluationConfig
    from worker.engine.evaluation import evaluate
    from worker.engine.report import build_report

    from .test_evaluation import digits_and_model

    splits, model = digits_and_model()
    ev = evaluate(model, {"h": model}, splits,
                  EvaluationConfig(protocol="minimal", attacks=["fgsm", "cw"], n_samples=10), seed=0)
    rep = build_report(config={}, versions={}, timings_s={}, evaluation=ev, chosen="h",
                       clean_drop_limit=0.1, slicing={}, mining={}, comparison=None)
    for name, norm in (("fgsm", "linf"), ("cw", "l2")):
        mp = rep["attacks"][name]["minimal_perturbation"]
        assert mp["norm"] == norm
        o, h = mp["original"], mp["hardened"]
        assert o["n"] == rep["attacks"][name]["n"] and o["q1"] <= o["median"] <= o["q3"]
        # the same model as "hardened": the same perturbation sizes
        assert h["median"] == pytest.approx(o["median"], rel=1e-3, abs=1e-4)
        curve = mp["curve"]
        assert len(curve["budget"]) == len(curve["original"]) == len(curve["hardened"])
        assert all(b <= a for a, b in zip(curve["original"], curve["original"][1:]))
        assert curve["original"][-1] == 0.0  # at the largest size seen, every kept point falls
    html = render_html(rep)
    assert 'data-chart="minimal-fgsm"' in html and "minimal L2 perturbation" in html
