"""Method selection in compare/auto: every method's grid judged by one rule on held-out validation
points, never on the test points; on_budget_miss; the time budget."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from worker.engine.config import parse_config
from worker.engine.errors import InputError
from worker.engine.reference.train import train_reference
from worker.engine.selection import (
    NoMethodWithinBudget,
    choose,
    mining_pool,
    selection_points,
    split_validation,
)
from worker.engine.stages import CONTROLS, StageContext, run_stage, stage_names

METHODS = ["dare", "dare_s", "at_fgsm", "at_pgd_online", "finetune_mined", "weight_noise"]
TINY = {"method": "auto",
        "evaluation": {"n_samples": 30, "attacks": ["fgsm", "pgd"], "eps": 0.1},
        "baselines": {"max_train": 150},
        "selection": {"dare": {"epochs": [1, 2], "lr": [1e-3, 3e-3],
                               "history_fraction": [0.5, 1.0]},
                      "adversarial": {"epochs": [1, 2], "lr": [1e-3]},
                      "methods": METHODS}}


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("subject")
    train_reference("mlp", "digits", 6, out, seed=0)
    return out


def _job(path, subject, data=None):
    (path / "inputs").mkdir(parents=True)
    for f in ("model.pt2", "history.zip"):
        shutil.copyfile(subject / f, path / "inputs" / f)
    if data is not None:
        shutil.copyfile(data, path / "inputs" / "data.npz")
    return path


def _run(wd, cfg, upto=None):
    ctx = StageContext(wd, parse_config(cfg))
    for name in stage_names(ctx.config):
        run_stage(name, ctx)
        if name == upto:
            break
    return ctx


def _report(wd):
    return json.loads((wd / "artifacts" / "report.json").read_text())


@pytest.fixture(scope="module")
def auto_job(subject, tmp_path_factory):
    wd = _job(tmp_path_factory.mktemp("auto"), subject)
    _run(wd, {**TINY, "dataset": "digits"})
    return wd


# --- the split --------------------------------------------------------------------------------

def test_selection_points_are_held_out_of_mining(subject):
    from worker.engine.data import load_embedded

    splits = load_embedded("digits", seed=0)
    cfg = parse_config({**TINY, "dataset": "digits"})
    hold, rest = split_validation(len(splits.y_val), 0.3, 0)
    assert len(set(hold.tolist()) & set(rest.tolist())) == 0
    assert len(hold) + len(rest) == len(splits.y_val)
    xs, _ = selection_points(splits, cfg)
    xm, _ = mining_pool(splits, cfg)
    # no selection point is among the mined candidates (compare rows as bytes)
    mined_rows = {r.numpy().tobytes() for r in xm.flatten(1)}
    assert not any(r.numpy().tobytes() in mined_rows for r in xs.flatten(1))
    # a job that does not select mines the whole validation split
    plain = parse_config({"dataset": "digits"})
    assert len(mining_pool(splits, plain)[0]) == len(splits.y_val)


# --- the rule and on_budget_miss ----------------------------------------------------------------

ROWS = {"a": {"val_clean": 0.70, "val_robust": 0.60},   # most robust, 20 points of clean lost
        "b": {"val_clean": 0.85, "val_robust": 0.30},   # closest to the budget
        "c": {"val_clean": 0.80, "val_robust": 0.50}}


def test_choose_within_budget_takes_the_most_robust():
    out = choose(ROWS, 0.90, 0.25, "fail")
    assert out == {**out, "chosen": "a", "within_budget": True, "budget_miss": False}
    assert choose(ROWS, 0.90, 0.10, "fail")["chosen"] == "c"  # a is over a 10-point budget


def test_on_budget_miss_fail_raises_a_coded_error():
    with pytest.raises(NoMethodWithinBudget) as e:
        choose(ROWS, 0.99, 0.10, "fail")
    assert isinstance(e.value, InputError) and e.value.code == "no_method_within_budget"
    assert "0.990" in e.value.message


def test_on_budget_miss_best_within_and_original():
    best = choose(ROWS, 0.99, 0.10, "best_within")
    assert best["chosen"] == "b" and best["within_budget"] is False and best["budget_miss"] is True
    orig = choose(ROWS, 0.99, 0.10, "original")
    assert orig["chosen"] == "unchanged" and orig["budget_miss"] is True


@pytest.fixture(scope="module")
def wrecked(subject, tmp_path_factory):
    """A job whose every grid point wrecks clean accuracy (Adam at lr 0.9), run up to compare."""
    wd = _job(tmp_path_factory.mktemp("wrecked"), subject)
    cfg = {**TINY, "dataset": "digits",
           "selection": {**TINY["selection"], "methods": ["dare", "at_fgsm"],
                         "dare": {"epochs": [2], "lr": [0.9], "history_fraction": [1.0]},
                         "adversarial": {"epochs": [2], "lr": [0.9]}}}
    _run(wd, cfg, upto="tune")
    return wd, cfg


def _rerun(wrecked, tmp_path, policy):
    wd0, cfg = wrecked
    wd = tmp_path / "job"
    shutil.copytree(wd0, wd)
    return wd, StageContext(wd, parse_config({**cfg, "on_budget_miss": policy}))


def test_stage_on_budget_miss_fail(wrecked, tmp_path):
    wd, ctx = _rerun(wrecked, tmp_path, "fail")
    with pytest.raises(InputError) as e:
        run_stage("compare", ctx)
    assert e.value.code == "no_method_within_budget"
    assert not (wd / "state" / "compare.done.json").exists()


def test_stage_on_budget_miss_original_ships_the_original(wrecked, tmp_path, subject):
    from safetensors.torch import load_file

    from worker.engine.modelio import load_model

    wd, ctx = _rerun(wrecked, tmp_path, "original")
    for name in ("compare", "export", "evaluate"):
        run_stage(name, ctx)
    rep = _report(wd)
    assert rep["method"] == "unchanged"
    assert rep["comparison"]["selection"]["outcome"]["budget_miss"] is True
    assert rep["clean_accuracy"]["drop"] == 0
    shipped = load_file(str(wd / "artifacts" / "hardened.safetensors"))
    original = load_model(subject / "model.pt2").gm.state_dict()
    assert all(torch.equal(shipped[k], original[k]) for k in shipped)


def test_stage_on_budget_miss_best_within_ships_the_closest(wrecked, tmp_path):
    wd, ctx = _rerun(wrecked, tmp_path, "best_within")
    for name in ("compare", "export", "evaluate"):
        run_stage(name, ctx)
    rep = _report(wd)
    sel = rep["comparison"]["selection"]
    rows = sel["methods"]
    assert not any(r["within_budget"] for r in rows.values())
    closest = max(rows, key=lambda m: rows[m]["val_clean"])
    assert rep["method"] == closest == sel["chosen"]
    assert sel["outcome"]["within_budget"] is False and sel["outcome"]["budget_miss"] is True
    assert rep["comparison"]["recommended"] is None  # nothing within the budget is recommended
    assert "best_within" in (wd / "artifacts" / "report.html").read_text()


# --- never the test points ------------------------------------------------------------------------

def test_selection_never_reads_the_test_points(subject, tmp_path):
    """The same job twice, the second with its test split poisoned (images reversed, labels
    shifted): the test figures change, the selection on validation must not move at all."""
    poisoned = tmp_path / "poisoned.npz"
    d = dict(np.load(subject / "data.npz"))
    d["x_test"], d["y_test"] = d["x_test"][::-1].copy(), (d["y_test"] + 1) % 10
    np.savez(poisoned, **d)
    cfg = {**TINY, "selection": {**TINY["selection"], "methods": ["dare", "at_fgsm",
                                                                  "at_pgd_online"]}}
    a = _job(tmp_path / "a", subject, subject / "data.npz")
    b = _job(tmp_path / "b", subject, poisoned)
    _run(a, cfg)
    _run(b, cfg)
    ra, rb = _report(a), _report(b)
    assert ra["clean_accuracy"]["original"] != rb["clean_accuracy"]["original"]  # test did change
    sa, sb = ra["comparison"]["selection"], rb["comparison"]["selection"]
    for key in ("original", "outcome", "chosen"):
        assert sa[key] == sb[key]
    for m in sa["methods"]:
        assert {k: v for k, v in sa["methods"][m].items() if k != "seconds"} == \
               {k: v for k, v in sb["methods"][m].items() if k != "seconds"}
    assert ra["method"] == rb["method"] == sa["chosen"]


# --- each method's grid and the report ---------------------------------------------------------

def test_every_method_is_chosen_from_its_grid_by_the_rule(auto_job):
    rep = _report(auto_job)
    sel = rep["comparison"]["selection"]
    cfg = parse_config({**TINY, "dataset": "digits"})
    orig_clean = sel["original"]["val_clean"]
    assert set(sel["methods"]) == set(METHODS)
    grids = {"dare": {"lr": 2, "q": 1, "history_fraction": 2}, "dare_s": {"lr": 2, "history_fraction": 2},
             "finetune_mined": {"lr": 2, "history_fraction": 2},
             "at_fgsm": {"lr": 1, "adv_fraction": 1}, "at_pgd_online": {"lr": 1, "adv_fraction": 1}}
    for m, sizes in grids.items():
        info = json.loads((auto_job / "state" / f"method_{m}.json").read_text())
        # every combination, scored at both epochs values
        assert len(info["grid"]) == 2 * int(np.prod(list(sizes.values())))
        combos = {tuple(r[p] for p in sorted(sizes)) + (r["epochs"],) for r in info["grid"]}
        assert len(combos) == len(info["grid"])
        # the rule, recomputed from the raw grid and the budget
        ok = [r for r in info["grid"] if orig_clean - r["val_clean"] <= cfg.clean_drop_limit + 1e-12]
        best = max(ok, key=lambda r: (r["val_robust"], r["val_clean"])) if ok else \
            max(info["grid"], key=lambda r: (r["val_clean"], r["val_robust"]))
        row = sel["methods"][m]
        assert row["settings"] == {k: best[k] for k in best
                                   if k not in ("val_clean", "val_robust", "within_budget", "note")}
        assert row["val_clean"] == best["val_clean"] and row["val_pgd"] == best["val_robust"]
    # the sample counts side by side: DARE's tutors per class, the baselines' clean + adversarial
    assert sum(sel["methods"]["dare"]["mined_per_class"]) == sel["methods"]["dare"]["n_samples"]
    assert sel["methods"]["at_fgsm"]["n_samples"] == 2 * 150
    assert rep["mining"]["baseline_samples"] == 150
    html = (auto_job / "artifacts" / "report.html").read_text()
    assert 'data-table="selection"' in html and "Final figures (test)" in html
    assert f"lr {sel['methods']['dare']['settings']['lr']}" in html


def test_auto_ships_the_validation_choice_and_never_a_control(auto_job):
    from safetensors.torch import load_file

    rep = _report(auto_job)
    sel = rep["comparison"]["selection"]
    rows = {m: r for m, r in sel["methods"].items() if m not in CONTROLS}
    ok = [m for m, r in rows.items() if r["within_budget"]]
    best = max(ok, key=lambda m: (rows[m]["val_robust"], rows[m]["val_clean"]))
    assert sel["chosen"] == best == rep["method"] == rep["comparison"]["recommended"]
    got = load_file(str(auto_job / "artifacts" / "hardened.safetensors"))
    want = load_file(str(auto_job / "state" / f"method_{best}.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


# --- the time budget ---------------------------------------------------------------------------

def test_the_time_budget_skips_the_expensive_method_and_lists_it(subject, tmp_path, monkeypatch):
    """Skipped for time and skipped because it cannot run on the model: one report field, a
    reason each. (AWP is made unavailable by stubbing its check: no reference subject keeps its
    weights as graph constants.)"""
    from worker.engine import robust_training

    monkeypatch.setattr(robust_training, "perturbable", lambda m: False)
    wd = _job(tmp_path, subject)
    cfg = {**TINY, "dataset": "digits", "budget_minutes": 1.0, "baselines": {"max_train": 600},
           "selection": {**TINY["selection"], "methods": ["dare", "at_fgsm", "at_pgd_online",
                                                          "weight_noise", "awp"],
                         "overrides": {"at_pgd_online": {"epochs": [1000]}}}}
    _run(wd, cfg)
    rep = _report(wd)
    sel, skipped = rep["comparison"]["selection"], rep["comparison"]["skipped"]
    assert "skipped" not in sel
    assert {k: v["reason"] for k, v in skipped.items()} == {"at_pgd_online": "time_budget",
                                                            "awp": "method_unavailable"}
    assert skipped["at_pgd_online"]["estimate_s"] > skipped["at_pgd_online"]["left_s"]
    assert "no weight" in skipped["awp"]["detail"]
    assert set(sel["methods"]) == {"dare", "at_fgsm", "weight_noise"}
    # cheapest first (weight_noise waits for the dare it is made from), the skipped one last
    assert sel["order"][-1] == "at_pgd_online" and sel["order"].index("weight_noise") > \
        sel["order"].index("dare")
    est = {m: r["estimate_s"] for m, r in sel["methods"].items()}
    assert est["dare"]["train_s"] == 0  # chosen already in the tune stage: nothing left to train
    assert est["at_fgsm"]["train_s"] > 0
    html = (wd / "artifacts" / "report.html").read_text()
    listed = html.split('data-list="skipped"')[1]
    assert "at_pgd_online" in listed and "no weight" in listed


# --- snapshots --------------------------------------------------------------------------------

def test_an_epoch_snapshot_scored_mid_run_equals_the_shorter_run():
    """The grid scores epochs values as snapshots of one run: the snapshot after epoch 1 of a
    2-epoch run (scored there with PGD) equals a 1-epoch run, and the scoring leaves the rest of
    the run as it would have been."""
    from tests.engine.test_evaluation import digits_and_model
    from worker.engine.baselines import _fit, online_adversary
    from worker.engine.selection import Judge

    splits, model = digits_and_model()
    judge = Judge(splits.x_val[:40], splits.y_val[:40], dataset="digits", eps=0.1, device="cpu",
                  seed=0)

    def train(epochs: int, score: bool):
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        adv, _ = online_adversary(m, dataset="digits", eps=0.1)
        snaps = {}

        def on_epoch(e, mm):
            if score:
                judge.score(mm)
            snaps[e] = {k: v.clone() for k, v in mm.state_dict().items()}
        _fit(m, splits.x_train[:128], splits.y_train[:128], lr=1e-3, epochs=epochs, batch_size=64,
             adv_fraction=0.5, adversary=adv, on_epoch=on_epoch)
        return m, snaps

    two, snaps = train(2, True)
    one, _ = train(1, False)
    plain, _ = train(2, False)
    assert set(snaps) == {1, 2}
    assert all(torch.equal(snaps[1][k], v) for k, v in one.state_dict().items())
    assert all(torch.equal(x, y) for x, y in zip(two.state_dict().values(), plain.state_dict().values()))
    assert any(not torch.equal(snaps[1][k], v) for k, v in two.state_dict().items())


def test_grid_lists_fill_from_the_family_defaults():
    from worker.engine.methods import REGISTRY
    from worker.engine.selection import grid_for

    cfg = parse_config({"selection": {"dare": {"lr": [0.01]},
                                      "overrides": {"dare_s": {"epochs": [7]}}}})
    assert grid_for(REGISTRY["dare"], cfg) == {"epochs": [5, 10], "lr": [0.01], "q": [0.95],
                                               "history_fraction": [0.5, 1.0]}
    assert grid_for(REGISTRY["dare_s"], cfg) == {"epochs": [7], "lr": [0.01],
                                                 "history_fraction": [0.5, 1.0]}
    assert grid_for(REGISTRY["at_pgd"], cfg) == {"epochs": [3, 5], "lr": [3e-4, 1e-3],
                                                 "adv_fraction": [0.5]}
