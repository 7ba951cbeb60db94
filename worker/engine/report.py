"""``report.json`` (schema version 1, DESIGN.md) and ``report.html``.

The JSON is for dashboards: its keys are a contract, so ``build_report`` emits exactly the schema's
keys (plus the allowed extras ``protocol``, ``method`` and ``pgd_curve``) and nothing else at the
top level. Accuracies are fractions in [0, 1]; a number that could not be measured (an adaptive
attack that was not run, an empty minimal-protocol set) is ``null``, never NaN.
"""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from .stats import wilson

SCHEMA_VERSION = 1
RULE = "highest mean adaptive robust accuracy within the clean budget"
RULE_NO_ADAPTIVE = ("highest mean transfer ER within the clean budget "
                    "(adaptive attacks were not run)")

REPORT_KEYS = ("schema_version", "config", "versions", "timings_s", "clean_accuracy", "attacks",
               "sanity_checks", "slicing", "mining", "comparison")
EXTRA_KEYS = ("protocol", "method", "pgd_curve", "threat_model")
ATTACK_KEYS = ("params", "n", "original_accuracy", "transfer_er", "adaptive_accuracy")
CLEAN_KEYS = ("original", "hardened", "drop", "budget", "within_budget")
# Additions that keep schema 1 (a reader of the keys above is unaffected): every attack's Wilson
# 95 % intervals; bounded C&W's perturbation sizes; AutoAttack's per-sub-attack breakdown; the
# clean accuracies' n and intervals.
ATTACK_EXTRA_KEYS = ("ci95", "l2_perturbation", "breakdown", "minimal_perturbation")
CLEAN_EXTRA_KEYS = ("n", "ci95")
METHOD_KEYS = ("clean_accuracy", "within_budget", "attacks", "mean_transfer_er",
               "mean_adaptive_accuracy")
_EPS = 1e-12  # a drop of exactly the budget is within it, whatever float rounding says


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def within_budget(original: float, hardened: float, clean_drop_limit: float) -> bool:
    return original - hardened <= clean_drop_limit + _EPS


def method_summary(evaluation: dict, name: str, clean_drop_limit: float) -> dict:
    """One ``comparison.methods`` entry for ``name`` from an ``evaluation.evaluate`` result."""
    clean = evaluation["clean"]
    attacks = {a: {"transfer_er": r["per_model"][name]["transfer_er"],
                   "adaptive_accuracy": r["per_model"][name]["adaptive_accuracy"]}
               for a, r in evaluation["attacks"].items()}
    return {"clean_accuracy": clean[name],
            "within_budget": within_budget(clean["original"], clean[name], clean_drop_limit),
            "attacks": attacks,
            "mean_transfer_er": _mean(v["transfer_er"] for v in attacks.values()),
            "mean_adaptive_accuracy": _mean(v["adaptive_accuracy"] for v in attacks.values())}


def recommend(methods: dict, clean_drop_limit: float, *, original_clean: float | None = None) -> str | None:
    """The method with the highest ``mean_adaptive_accuracy`` among those within the clean budget.

    methods: ``{name: method_summary(...)}``. Budget membership is each entry's ``within_budget``,
    or, when ``original_clean`` is given, recomputed from it and ``clean_drop_limit``. Ties go to
    the higher clean accuracy, then the name. When no method ran adaptive attacks the mean transfer
    ER decides instead (see ``rule_for``). Returns None when no method keeps the budget: recommending
    one that breaks it would break the rule.
    """
    def ok(m):
        if original_clean is not None:
            return within_budget(original_clean, m["clean_accuracy"], clean_drop_limit)
        return bool(m["within_budget"])

    key = "mean_adaptive_accuracy" if _has_adaptive(methods) else "mean_transfer_er"
    eligible = [(n, m) for n, m in methods.items() if ok(m)]
    if not eligible:
        return None

    def score(item):
        n, m = item
        v = m[key]
        return (v if v is not None else -1.0, m["clean_accuracy"], [-ord(c) for c in n])

    return max(eligible, key=score)[0]


def _has_adaptive(methods: dict) -> bool:
    return any(m.get("mean_adaptive_accuracy") is not None for m in methods.values())


def rule_for(methods: dict) -> str:
    return RULE if _has_adaptive(methods) or not methods else RULE_NO_ADAPTIVE


def build_comparison(comparison: dict, clean_drop_limit: float, selection: dict | None = None,
                     skipped: dict | None = None) -> dict:
    """``comparison`` is an ``evaluate`` result over the compared methods, or already
    ``{"methods": {...}}``; returns ``{"methods", "recommended", "rule", "skipped"}``.

    With ``selection`` (the compare stage's choice on the validation split), the recommendation
    and its rule are the selection's and the selection table is kept beside the test figures
    under ``"selection"``; without it, the recommendation is recomputed from the figures given.
    ``skipped``: the methods the compare did not run, ``{name: {"reason", "detail", ...}}``;
    ``reason`` is ``method_unavailable`` (it cannot run on this model, e.g. AWP without a weight
    parameter), ``needs_skipped`` (made from a method that did not run) or ``time_budget``
    (``budget_minutes`` left no room; with ``estimate_s`` and ``left_s``)."""
    if "methods" in comparison:
        methods = {k: {f: v[f] for f in METHOD_KEYS} for k, v in comparison["methods"].items()}
    else:
        names = [k for k in comparison["clean"] if k != "original"]
        methods = {k: method_summary(comparison, k, clean_drop_limit) for k in names}
    skipped = {k: dict(v) for k, v in (skipped or {}).items()}
    if selection is not None:
        return {"methods": methods, "recommended": selection.get("recommended"),
                "rule": selection.get("rule"), "selection": selection, "skipped": skipped}
    return {"methods": methods, "recommended": recommend(methods, clean_drop_limit),
            "rule": rule_for(methods), "skipped": skipped}


def build_report(*, config: dict, versions: dict, timings_s: dict, evaluation: dict, chosen: str,
                 clean_drop_limit: float, slicing: dict, mining: dict,
                 comparison: dict | None, selection: dict | None = None,
                 skipped: dict | None = None) -> dict:
    """The ``report.json`` object (schema 1) for the hardened model ``chosen``.

    evaluation: an ``evaluation.evaluate`` result that includes ``chosen`` among its hardened
    models. comparison: None, or what ``build_comparison`` accepts; selection: the compare
    stage's choice on the validation split (``build_comparison``). slicing ``{"q",
    "key_synapse_fraction"}`` and mining ``{"candidates", "mined"}`` are copied as given.
    """
    clean = evaluation["clean"]
    if chosen not in clean:
        raise KeyError(f"the evaluation has no model named {chosen!r} (has {sorted(clean)})")
    orig, hard = clean["original"], clean[chosen]
    attacks = {}
    for a, r in evaluation["attacks"].items():
        pm = r["per_model"][chosen]
        attacks[a] = {"params": dict(r["params"]), "n": r["n"],
                      "original_accuracy": r["original_accuracy"],
                      "transfer_er": pm["transfer_er"], "adaptive_accuracy": pm["adaptive_accuracy"]}
        # Sampling uncertainty: every accuracy with its Wilson 95 % interval on the attack's n.
        attacks[a]["ci95"] = {k: wilson(attacks[a][k], r["n"])
                              for k in ("original_accuracy", "transfer_er", "adaptive_accuracy")}
        if "l2_perturbation" in r:
            # bounded C&W: the size of the successful perturbations, both models
            attacks[a]["l2_perturbation"] = {**r["l2_perturbation"],
                                             "hardened": pm.get("l2_perturbation")}
        if "minimal_perturbation" in r:
            # minimal protocol: the distribution of minimal perturbation sizes, both models
            mp = r["minimal_perturbation"]
            curve = mp.get("curve") or {}
            attacks[a]["minimal_perturbation"] = {
                "norm": mp["norm"], "note": mp["note"], "original": mp["original"],
                "hardened": pm.get("minimal_perturbation"),
                "curve": {"budget": curve.get("budget"), "original": curve.get("original"),
                          "hardened": curve.get(chosen)}}
        if "breakdown" in r:
            # AutoAttack: robust accuracy after each sub-attack, for both models.
            attacks[a]["breakdown"] = {"original": r["breakdown"].get("original"),
                                       "hardened": pm.get("breakdown")}
    report = {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "versions": versions,
        "timings_s": {**dict(timings_s), **_attack_timings(evaluation)},
        "clean_accuracy": {"original": orig, "hardened": hard, "drop": orig - hard,
                           "budget": clean_drop_limit,
                           "within_budget": within_budget(orig, hard, clean_drop_limit),
                           "n": evaluation.get("n_test"),
                           "ci95": {"original": wilson(orig, evaluation.get("n_test")),
                                    "hardened": wilson(hard, evaluation.get("n_test"))}},
        "attacks": attacks,
        "sanity_checks": [{"name": c["name"], "passed": bool(c["passed"]), "detail": c["detail"]}
                          for c in evaluation["sanity_checks"]],
        "slicing": dict(slicing),
        "mining": dict(mining),
        "comparison": (None if comparison is None
                       else build_comparison(comparison, clean_drop_limit, selection, skipped)),
        "protocol": evaluation["protocol"],
        "method": chosen,
        "pgd_curve": evaluation.get("pgd_curve"),
        # every budget with its source (config, dataset, or derived from the data)
        "threat_model": evaluation.get("threat_model"),
    }
    return _jsonable(report)


def _attack_timings(evaluation: dict) -> dict:
    # AutoAttack's cost is stated on its own: it is most of the evaluate stage's time.
    t = (evaluation.get("timings_s") or {}).get("autoattack")
    return {} if t is None else {"autoattack": t}


def headline_attack(attacks: dict) -> str | None:
    """``"autoattack"`` when AutoAttack measured both models: its robust accuracy is the headline
    (the verdict and the report's first tile); None: the mean over the attacks instead."""
    a = attacks.get("autoattack")
    if isinstance(a, dict) and a.get("original_accuracy") is not None \
            and a.get("adaptive_accuracy") is not None:
        return "autoattack"
    return None


def versions() -> dict:
    """Library, interpreter and platform versions for the report (None where not installed)."""
    from importlib import metadata

    import torch

    def v(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "python": platform.python_version(), "onnx": v("onnx"),
            "onnxruntime": v("onnxruntime"),
            "pyautoattack": v("pyautoattack"),
            "platform": platform.platform(), "cuda": torch.version.cuda if cuda else None,
            "gpu": torch.cuda.get_device_name(0) if cuda else None}


def _jsonable(obj):
    """Plain JSON types: NaN/inf become None, tuples lists, numpy/torch scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):  # numpy or torch scalar
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot put {type(obj).__name__} into report.json")


def _atomic_write(path: Path, text: str) -> None:
    # A re-run stage or a reader polling the directory never sees half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(report: dict, out_dir) -> dict[str, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``; returns their paths by name."""
    from .report_html import render_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = _jsonable(report)
    paths = {"report.json": out / "report.json", "report.html": out / "report.html"}
    _atomic_write(paths["report.json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    _atomic_write(paths["report.html"], render_html(report))
    return paths
