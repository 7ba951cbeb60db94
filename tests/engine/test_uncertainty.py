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
