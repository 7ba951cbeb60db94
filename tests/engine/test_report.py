"""report.json schema 1 (DESIGN.md), the recommendation rule and the self-contained HTML page."""
from __future__ import annotations

import json
import re

import pytest

from worker.engine import report as R
from worker.engine.report_html import render_html

ATTACKS = ("fgsm", "bim", "pgd", "cw", "jsma")


def _evaluation(models: dict[str, tuple[float, float, float | None]], *, clean_orig=0.95,
                clean: dict | None = None) -> dict:
    """An ``evaluate``-shaped result: models maps name -> (clean acc, transfer, adaptive)."""
    clean_all = {"original": clean_orig, **{k: v[0] for k, v in models.items()}}
    if clean:
        clean_all.update(clean)
    attacks = {a: {"params": {"eps": 0.1, "threat_model": "fixed_eps"}, "n": 100,
                   "original_accuracy": 0.05,
                   "per_model": {k: {"transfer_er": v[1], "adaptive_accuracy": v[2]}
                                 for k, v in models.items()}}
               for a in ATTACKS}
    return {"protocol": "fixed_eps", "eps": 0.1, "n_samples": 100, "clean": clean_all,
            "clean_on_samples": clean_all, "attacks": attacks,
            "sanity_checks": [{"name": "original: near_zero_at_large_eps", "passed": True, "detail": "ok"},
                              {"name": "dare: near_zero_at_large_eps", "passed": False,
                               "detail": "accuracy 0.4 at eps=0.5"}],
            "pgd_curve": {"eps": [0.0, 0.05, 0.1, 0.5], "original": [0.95, 0.5, 0.2, 0.0],
                          "dare": [0.9, 0.6, 0.3, 0.0]}}


def _report(comparison=None, **kw) -> dict:
    ev = _evaluation({"dare": (0.90, 0.6, 0.3)})
    args = dict(config={"q": 0.95, "webhook_url": "https://hooks.example.com/secret-token"},
                versions=R.versions(), timings_s={"slice": 1.0, "mine": 2.0, "tune": 3.0, "evaluate": 4.0},
                evaluation=ev, chosen="dare", clean_drop_limit=0.10,
                slicing={"q": 0.95, "key_synapse_fraction": 0.4}, mining={"candidates": 300, "mined": 120},
                comparison=comparison)
    args.update(kw)
    return R.build_report(**args)


def test_report_keys_match_schema_1_exactly():
    rep = _report()
    assert set(rep) == set(R.REPORT_KEYS) | {"protocol", "method", "pgd_curve", "threat_model"}
    assert rep["schema_version"] == 1
    assert set(rep["clean_accuracy"]) == {"original", "hardened", "drop", "budget", "within_budget",
                                          "n", "ci95"}
    assert set(rep["attacks"]) == set(ATTACKS)
    for a in rep["attacks"].values():
        assert set(a) == {"params", "n", "original_accuracy", "transfer_er", "adaptive_accuracy",
                          "ci95"}
        assert set(a["ci95"]) == {"original_accuracy", "transfer_er", "adaptive_accuracy"}
    assert all(set(c) == {"name", "passed", "detail"} for c in rep["sanity_checks"])
    assert set(rep["versions"]) >= {"torch", "python", "onnx", "onnxruntime", "pyautoattack", "platform", "cuda"}
    assert rep["comparison"] is None
    ca = rep["clean_accuracy"]
    assert ca["drop"] == pytest.approx(0.05) and ca["within_budget"] is True and ca["budget"] == 0.10
    assert rep["attacks"]["pgd"]["transfer_er"] == 0.6 and rep["attacks"]["pgd"]["adaptive_accuracy"] == 0.3
    # the failed sanity check is carried, not dropped
    assert any(not c["passed"] for c in rep["sanity_checks"])
    json.dumps(rep, allow_nan=False)


def test_clean_budget_violation_is_reported():
    ev = _evaluation({"dare": (0.80, 0.6, 0.3)})
    rep = _report(evaluation=ev)
    assert rep["clean_accuracy"]["within_budget"] is False
    assert rep["clean_accuracy"]["drop"] == pytest.approx(0.15)


def test_comparison_section_from_an_evaluation():
    comp = _evaluation({"dare": (0.90, 0.6, 0.30), "at_pgd": (0.88, 0.5, 0.40),
                        "at_fgsm": (0.70, 0.9, 0.80)})  # best adaptive, but 25 points of clean lost
    rep = _report(comparison=comp)
    c = rep["comparison"]
    assert set(c) == {"methods", "recommended", "rule", "skipped"} and c["skipped"] == {}
    assert set(c["methods"]) == {"dare", "at_pgd", "at_fgsm"}
    for m in c["methods"].values():
        assert set(m) == {"clean_accuracy", "within_budget", "attacks", "mean_transfer_er", "mean_adaptive_accuracy"}
        assert set(m["attacks"]) == set(ATTACKS)
        assert all(set(v) == {"transfer_er", "adaptive_accuracy"} for v in m["attacks"].values())
    assert c["methods"]["at_fgsm"]["within_budget"] is False
    assert c["methods"]["at_pgd"]["mean_adaptive_accuracy"] == pytest.approx(0.40)
    assert c["recommended"] == "at_pgd"
    assert c["rule"] == "highest mean adaptive robust accuracy within the clean budget"


def _m(clean, within, adaptive, transfer=0.5):
    return {"clean_accuracy": clean, "within_budget": within, "attacks": {},
            "mean_transfer_er": transfer, "mean_adaptive_accuracy": adaptive}


def test_recommend_ignores_out_of_budget_better_method():
    methods = {"dare": _m(0.9, True, 0.3), "at_pgd": _m(0.88, True, 0.35), "at_bim": _m(0.6, False, 0.9)}
    assert R.recommend(methods, 0.10) == "at_pgd"
    # the same decision when membership is recomputed from the original's clean accuracy
    assert R.recommend(methods, 0.10, original_clean=0.95) == "at_pgd"
    # a looser budget readmits at_bim
    assert R.recommend(methods, 0.40, original_clean=0.95) == "at_bim"


def test_recommend_ties_and_edge_cases():
    assert R.recommend({"b": _m(0.9, True, 0.3), "a": _m(0.91, True, 0.3)}, 0.1) == "a"  # higher clean
    assert R.recommend({"b": _m(0.9, True, 0.3), "a": _m(0.9, True, 0.3)}, 0.1) == "a"   # then name
    assert R.recommend({"x": _m(0.5, False, 0.9)}, 0.1) is None                          # nobody in budget
    # adaptive attacks not run: the mean transfer ER decides and the rule says so
    methods = {"a": _m(0.9, True, None, 0.4), "b": _m(0.9, True, None, 0.6)}
    assert R.recommend(methods, 0.1) == "b"
    assert "transfer" in R.rule_for(methods)


def test_build_report_refuses_unknown_chosen_method():
    with pytest.raises(KeyError, match="at_cw"):
        _report(chosen="at_cw")


def test_nan_becomes_null_and_files_are_written(tmp_path):
    ev = _evaluation({"dare": (0.90, float("nan"), None)})
    rep = _report(evaluation=ev)
    assert rep["attacks"]["fgsm"]["transfer_er"] is None
    paths = R.write_report(rep, tmp_path / "artifacts")
    assert set(paths) == {"report.json", "report.html"}
    loaded = json.loads(paths["report.json"].read_text())
    assert loaded == rep
    assert paths["report.html"].read_text().startswith("<!DOCTYPE html>")
    assert not list((tmp_path / "artifacts").glob("*.tmp"))


def test_html_is_self_contained_with_charts():
    comp = _evaluation({"dare": (0.90, 0.6, 0.30), "at_pgd": (0.88, 0.5, 0.40)})
    page = render_html(_report(comparison=comp))
    for chart in ("attacks", "clean", "pgd", "timings"):  # grouped bars per attack, and the rest
        assert f'<svg class="chart" data-chart="{chart}"' in page
    assert "http://" not in page and "https://" not in page  # the webhook URL is redacted too
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert not re.search(r"\b(src|href)=", page)
    assert "FAIL" in page  # the failed sanity check is visible
    assert "at_pgd" in page and 'class="rec"' in page
    for a in ATTACKS:
        assert a.upper() in page


def test_html_escapes_untrusted_text():
    rep = _report(config={"q": 0.95, "dataset": "<script>alert(1)</script>"})
    page = render_html(rep)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_versions_are_strings_or_none():
    v = R.versions()
    assert all(x is None or isinstance(x, str) for x in v.values())
    assert v["torch"] and v["python"].startswith("3.") and v["onnx"]


def test_report_from_a_real_evaluation(tmp_path):
    import copy

    from tests.engine.test_evaluation import digits_and_model
    from worker.engine.config import EvaluationConfig
    from worker.engine.evaluation import evaluate

    splits, m = digits_and_model()
    ev = evaluate(m, {"dare": copy.deepcopy(m)}, splits,
                  EvaluationConfig(n_samples=20, attacks=["fgsm", "pgd"]))
    rep = _report(evaluation=ev, comparison=ev)
    assert set(rep["attacks"]) == {"fgsm", "pgd"}
    assert rep["comparison"]["recommended"] == "dare"
    assert rep["pgd_curve"]["eps"][0] == 0.0 and "dare" in rep["pgd_curve"]
    paths = R.write_report(rep, tmp_path)
    page = paths["report.html"].read_text()
    assert "<polyline" in page and "http" not in page.replace("(redacted)", "")


def test_versions_name_the_first_gpu_and_none_without_one(monkeypatch):
    import torch

    if not torch.cuda.is_available():
        v = R.versions()
        assert v["cuda"] is None and v["gpu"] is None
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: asked.append(i) or f"GPU{i}")
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    v = R.versions()
    assert (v["cuda"], v["gpu"], asked) == ("12.9", "GPU0", [0])


def test_a_package_that_is_not_installed_has_no_version(monkeypatch):
    from importlib import metadata

    real = metadata.version

    def version(pkg):
        if pkg == "pyautoattack":
            raise metadata.PackageNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(metadata, "version", version)
    v = R.versions()
    assert v["pyautoattack"] is None and v["onnxruntime"] == real("onnxruntime")


def test_paths_become_strings_and_the_directories_are_made(tmp_path):
    from pathlib import Path

    assert R._jsonable({"p": Path("/a/b"), 1: (True, None)}) == {"p": "/a/b", "1": [True, None]}
    with pytest.raises(TypeError, match="object"):
        R._jsonable({"x": object()})
    paths = R.write_report(_report(), tmp_path / "job" / "artifacts")
    assert json.loads(paths["report.json"].read_text())["method"] == "dare"


def test_autoattack_is_the_headline_only_when_it_measured_both_models():
    both = {"original_accuracy": 0.1, "adaptive_accuracy": 0.2}
    assert R.headline_attack({"pgd": both, "autoattack": both}) == "autoattack"
    assert R.headline_attack({"autoattack": {**both, "adaptive_accuracy": None}}) is None
    assert R.headline_attack({"autoattack": {**both, "original_accuracy": None}}) is None
    assert R.headline_attack({"pgd": both}) is None and R.headline_attack({"autoattack": 0.3}) is None


def test_autoattack_time_is_stated_beside_the_stages():
    ev = _evaluation({"dare": (0.90, 0.6, 0.3)})
    ev["timings_s"] = {"autoattack": 12.5, "pgd": 1.0}
    assert _report(evaluation=ev)["timings_s"] == {"slice": 1.0, "mine": 2.0, "tune": 3.0,
                                                   "evaluate": 4.0, "autoattack": 12.5}
    ev["timings_s"] = {"pgd": 1.0}
    assert "autoattack" not in _report(evaluation=ev)["timings_s"]


def test_intervals_and_the_extra_sections_of_an_attack():
    from worker.engine.stats import wilson

    ev = _evaluation({"dare": (0.90, 0.6, 0.3), "at_pgd": (0.85, 0.7, 0.5)})
    ev["n_test"] = 400
    pgd = ev["attacks"]["pgd"]
    pgd["l2_perturbation"] = {"original": {"median": 0.4}, "note": "n"}
    pgd["per_model"]["dare"]["l2_perturbation"] = {"median": 0.7}
    pgd["minimal_perturbation"] = {"norm": "linf", "note": "m", "original": {"median": 0.1},
                                   "curve": {"budget": [0.0, 0.1], "original": [0.9, 0.1],
                                             "dare": [0.9, 0.5], "at_pgd": [0.9, 0.6]}}
    pgd["per_model"]["dare"]["minimal_perturbation"] = {"median": 0.2}
    pgd["breakdown"] = {"original": {"clean": 0.9}, "dare": {"clean": 0.8}}
    pgd["per_model"]["dare"]["breakdown"] = {"clean": 0.8}
    rep = _report(evaluation=ev)
    a = rep["attacks"]["pgd"]
    assert a["ci95"] == {"original_accuracy": wilson(0.05, 100), "transfer_er": wilson(0.6, 100),
                         "adaptive_accuracy": wilson(0.3, 100)}
    assert a["l2_perturbation"] == {"original": {"median": 0.4}, "note": "n", "hardened": {"median": 0.7}}
    assert a["minimal_perturbation"] == {
        "norm": "linf", "note": "m", "original": {"median": 0.1}, "hardened": {"median": 0.2},
        "curve": {"budget": [0.0, 0.1], "original": [0.9, 0.1], "hardened": [0.9, 0.5]}}
    assert a["breakdown"] == {"original": {"clean": 0.9}, "hardened": {"clean": 0.8}}
    assert "l2_perturbation" not in rep["attacks"]["fgsm"]
    ca = rep["clean_accuracy"]
    assert ca["n"] == 400 and ca["ci95"] == {"original": wilson(0.95, 400), "hardened": wilson(0.90, 400)}


def test_method_means_skip_missing_numbers_and_summaries_pass_through():
    ev = _evaluation({"dare": (0.90, 0.6, 0.3)})
    ev["attacks"]["pgd"]["per_model"]["dare"] = {"transfer_er": 0.1, "adaptive_accuracy": None}
    s = R.method_summary(ev, "dare", 0.04)
    assert s["mean_transfer_er"] == pytest.approx((4 * 0.6 + 0.1) / 5)
    assert s["mean_adaptive_accuracy"] == pytest.approx(0.3)  # the mean of the four it has
    assert s["within_budget"] is False and s["clean_accuracy"] == 0.90
    given = {"methods": {"a": {**_m(0.9, True, 0.3), "extra": 1}, "b": _m(0.9, False, 0.9)}}
    comp = R.build_comparison(given, 0.1)
    assert comp["methods"]["a"] == _m(0.9, True, 0.3) and comp["recommended"] == "a"
    assert R.rule_for({}) == R.RULE
