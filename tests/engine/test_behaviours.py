"""Behaviours that one-line mutants used to get past (issue 14). Each test sets the thing the
behaviour depends on away from where the other tests leave it: two classes and weight decay for
masked tuning, a final model that is wrong but confident, two different models for the adaptive
attack, a drop exactly at the budget, epsilons away from their defaults."""
from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from worker.engine import attacks as attacks_api
from worker.engine import report as R
from worker.engine import sanity
from worker.engine.config import EvaluationConfig, TuneConfig, parse_config
from worker.engine.evaluation import accuracy, evaluate, select_samples
from worker.engine.graph import analyze
from worker.engine.mining import mine_oracles
from worker.engine.profiling import profile
from worker.engine.slicing import slice_model
from worker.engine.tuning import tune_dare

from .tiny import only_classes, trained

# --- masked tuning --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sliced_and_mined():
    gm, history, data = trained()
    info = analyze(gm)
    prof = profile(info, data.x_train, data.y_train, 10)
    res = slice_model(info, prof, 0.95, 1)
    mined = mine_oracles(gm, res.cut_node, info.output_node, history, data.x_val, data.y_val)
    return gm, res, mined


def test_weight_decay_never_moves_a_weight_outside_every_class_mask(sliced_and_mined):
    """Adam's weight decay pulls every weight it holds, gradient or not: only the restore after
    each step keeps the weights that no class's mask frees where they were."""
    gm, res, mined = sliced_and_mined
    two = only_classes(mined, (3, 5))
    tuned, _ = tune_dare(gm, res, two, TuneConfig(epochs=2, batch_size=8, weight_decay=0.1))
    moved_inside = 0
    for k, m in res.masks.items():
        freed = m[3] | m[5]
        before, after = gm.state_dict()[k], tuned.state_dict()[k]
        assert torch.equal(before[~freed], after[~freed]), k
        moved_inside += int((before[freed] != after[freed]).sum())
    assert moved_inside > 0


def test_tuning_progress_ends_at_one_and_an_empty_mined_set_changes_nothing(sliced_and_mined):
    from worker.engine.tuning import tune_full_model

    gm, res, mined = sliced_and_mined
    two = only_classes(mined, (3, 5))
    for tune in (lambda **kw: tune_dare(gm, res, two, **kw),
                 lambda **kw: tune_full_model(gm, two, **kw)):
        seen = []
        _, info = tune(cfg=TuneConfig(epochs=3), progress=seen.append)
        assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 3
        assert info["loss_first"] is not None and info["loss_last"] is not None
    empty = only_classes(mined, ())
    for model, _ in (tune_dare(gm, res, empty, TuneConfig(epochs=2)),
                     tune_full_model(gm, empty, TuneConfig(epochs=2))):
        assert all(torch.equal(v, gm.state_dict()[k]) for k, v in model.state_dict().items())


def test_dare_sl_reports_the_mean_loss_of_its_first_epoch(sliced_and_mined):
    """With a vanishing learning rate the first epoch's mean loss is the model's own
    cross-entropy against the tutor's distribution over the whole mined set."""
    import torch.nn.functional as F

    from worker.engine.tuning import tune_full_model

    gm, _, mined = sliced_and_mined
    _, info = tune_full_model(gm, mined, TuneConfig(epochs=1, lr=1e-12, batch_size=16))
    with torch.no_grad():
        want = F.cross_entropy(gm(mined.x), torch.softmax(mined.tutor_logits.float(), 1))
    assert info["loss_first"] == pytest.approx(float(want), rel=1e-4)
    assert info["loss_last"] == info["loss_first"]


# --- mining ---------------------------------------------------------------------------------

def _biased(gm, probs: list[float]):
    """A copy of ``gm`` whose logits are log(probs) whatever the input (fc2 weights zeroed)."""
    m = copy.deepcopy(gm)
    with torch.no_grad():
        m.get_parameter("fc2.weight").zero_()
        m.get_parameter("fc2.bias").copy_(torch.tensor(probs).log())
    return m


def _probs(top: dict[int, float], k: int = 10) -> list[float]:
    rest = (1 - sum(top.values())) / (k - len(top))
    return [top.get(i, rest) for i in range(k)]


def test_a_wrong_final_model_counts_as_confidence_zero():
    """Class 0: the final model gives it 0.40 but says class 1 (0.45), so it is wrong; checkpoint
    A says class 0 with only 0.35, which beats a wrong model's 0. Class 1: the final model is right
    with 0.45; checkpoint B is right too but with 0.42, so no tutor."""
    from types import SimpleNamespace

    gm, _, data = trained()
    info = analyze(gm)
    final = _biased(gm, _probs({0: 0.40, 1: 0.45}))
    ck_a = _biased(gm, _probs({0: 0.35, 1: 0.30}))
    ck_b = _biased(gm, _probs({0: 0.30, 1: 0.42}))
    history = [SimpleNamespace(name=n, state=m.state_dict()) for n, m in (("a", ck_a), ("b", ck_b))]
    x = data.x_val[:12]
    y = torch.tensor([0, 1] * 6)
    _, cut = info.cut(1)
    mined = mine_oracles(final, cut, info.output_node, history, x, y, fraction=1.0)
    assert mined.y.tolist() == [0] * 6
    assert mined.tutor.tolist() == [0] * 6  # checkpoint a
    assert torch.equal(mined.x, x[y == 0])


# --- evaluation: the adaptive attack and the L-inf budget -----------------------------------

EPS = 0.05  # digits' stated budget is 0.1 (attacks/budgets.py)


@pytest.fixture(scope="module")
def spied_evaluation():
    """evaluate() of the original and one noisy copy (two different models) with eps = 0.05,
    every make_attack call recorded; the sanity checks (which build attacks of their own) are
    stubbed so the record holds only the evaluation's attacks."""
    gm, _, data = trained()
    noisy = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    calls = []
    real = attacks_api.make_attack

    def spy(name, model, *a, **kw):
        atk = real(name, model, *a, **kw)
        calls.append((name, model, atk.params()))
        return atk

    mp = pytest.MonkeyPatch()
    mp.setattr(attacks_api, "make_attack", spy)
    mp.setattr(sanity, "run_sanity", lambda *a, **kw: ([], []))
    try:
        cfg = EvaluationConfig(n_samples=40, attacks=["fgsm", "bim", "pgd"], eps=EPS)
        res = evaluate(gm, {"noisy": noisy}, data, cfg, seed=0)
    finally:
        mp.undo()
    return res, calls, gm, noisy, data


def test_the_adaptive_attack_is_built_against_each_hardened_model(spied_evaluation):
    res, calls, gm, noisy, _ = spied_evaluation
    for name in ("fgsm", "bim", "pgd"):
        targets = [m for n, m, _ in calls if n == name]
        assert len(targets) == 2, name  # one against the original, one against "noisy"
        assert any(m is gm for m in targets) and any(m is noisy for m in targets), name


def test_adaptive_accuracy_is_the_hardened_model_on_its_own_attack(spied_evaluation):
    """FGSM is deterministic: the numbers can be recomputed outside evaluate()."""
    res, _, gm, noisy, data = spied_evaluation
    idx = select_samples(len(data.x_test), 40, 0)
    x, y = data.x_test[idx], data.y_test[idx]
    own = attacks_api.make_attack("fgsm", noisy, dataset="digits", eps=EPS)(x, y)
    orig = attacks_api.make_attack("fgsm", gm, dataset="digits", eps=EPS)(x, y)
    pm = res["attacks"]["fgsm"]["per_model"]["noisy"]
    assert pm["adaptive_accuracy"] == accuracy(noisy, own, y)
    assert pm["transfer_er"] == accuracy(noisy, orig, y)
    assert res["attacks"]["fgsm"]["original_accuracy"] == accuracy(gm, orig, y)
    assert pm["adaptive_accuracy"] != pm["transfer_er"]  # the two models really differ here


def test_evaluation_eps_reaches_every_linf_attack(spied_evaluation):
    res, calls, _, _, _ = spied_evaluation
    assert res["eps"] == EPS
    for name in ("fgsm", "bim", "pgd"):
        assert res["attacks"][name]["params"]["eps"] == EPS, name
    assert len(calls) == 6 and all(p["eps"] == EPS for _, _, p in calls)
    assert all(p["alpha"] == EPS / 4 for n, _, p in calls if n != "fgsm")


# --- the clean-accuracy budget --------------------------------------------------------------

def test_a_drop_exactly_at_the_budget_is_within_it():
    assert 0.8 - 0.7 > 0.1  # in floating point this drop exceeds the budget by rounding
    assert R.within_budget(0.8, 0.7, 0.1)
    assert R.within_budget(0.75, 0.5, 0.25)  # exactly representable
    assert not R.within_budget(0.8, 0.7, 0.0999)
    assert not R.within_budget(0.75, 0.5, 0.2499)
    methods = {"at_budget": {"clean_accuracy": 0.7, "within_budget": None, "attacks": {},
                             "mean_transfer_er": 0.5, "mean_adaptive_accuracy": 0.9},
               "inside": {"clean_accuracy": 0.79, "within_budget": None, "attacks": {},
                          "mean_transfer_er": 0.5, "mean_adaptive_accuracy": 0.1}}
    assert R.recommend(methods, 0.1, original_clean=0.8) == "at_budget"
    ev = {"protocol": "fixed_eps", "clean": {"original": 0.8, "dare": 0.7}, "attacks": {},
          "sanity_checks": []}
    rep = R.build_report(config={}, versions={}, timings_s={}, evaluation=ev, chosen="dare",
                         clean_drop_limit=0.1, slicing={}, mining={}, comparison=None)
    assert rep["clean_accuracy"]["within_budget"] is True
    comp = R.build_comparison({**ev, "attacks": {}}, 0.1)
    assert comp["methods"]["dare"]["within_budget"] is True


def test_a_method_without_an_adaptive_score_ranks_last():
    """A method whose adaptive attacks were not run has no score: it must not beat one that has."""
    def m(adaptive):
        return {"clean_accuracy": 0.9, "within_budget": True, "attacks": {},
                "mean_transfer_er": 0.9 if adaptive is None else 0.1,
                "mean_adaptive_accuracy": adaptive}

    assert R.recommend({"unscored": m(None), "scored": m(0.2)}, 0.1) == "scored"
    assert R.recommend({"unscored": m(None), "zero": m(0.0)}, 0.1) == "zero"


def test_report_files_take_numpy_and_torch_scalars_and_can_be_rewritten(tmp_path):
    import numpy as np

    rep = {"a": np.float32(0.5), "b": torch.tensor(2), "c": [np.int64(3)], "d": float("nan")}
    assert R._jsonable(rep) == {"a": 0.5, "b": 2, "c": [3], "d": None}
    out = tmp_path / "artifacts"
    out.mkdir()  # a re-run stage writes into the directory it left
    for _ in range(2):
        paths = R.write_report(_minimal_report(), out)
    assert json.loads(paths["report.json"].read_text())["method"] == "dare"


def _minimal_report() -> dict:
    ev = {"protocol": "fixed_eps", "clean": {"original": 0.8, "dare": 0.75}, "attacks": {},
          "sanity_checks": []}
    return R.build_report(config={}, versions={}, timings_s={}, evaluation=ev, chosen="dare",
                          clean_drop_limit=0.1, slicing={}, mining={}, comparison=None)


# --- DARE-adv: tune.adv_eps reaches its PGD -------------------------------------------------

@pytest.fixture(scope="module")
def mined_job(tmp_path_factory):
    """A job directory with its slice and mine stages done (reference MLP on digits)."""
    from worker.engine.reference.train import train_reference
    from worker.engine.stages import StageContext, run_stage

    subject = tmp_path_factory.mktemp("subject")
    train_reference("mlp", "digits", 3, subject, seed=0)
    wd = tmp_path_factory.mktemp("job")
    (wd / "inputs").mkdir()
    for f in ("model.pt2", "history.zip"):
        shutil.copyfile(subject / f, wd / "inputs" / f)
    ctx = StageContext(wd, parse_config({"dataset": "digits"}))
    for name in ("validate", "slice", "mine"):
        run_stage(name, ctx)
    assert json.loads((wd / "state" / "mine.done.json").read_text())["summary"]["mined"] > 0
    return wd


def test_tune_adv_eps_reaches_dare_adv_pgd(mined_job, monkeypatch):
    from worker.engine.stages import StageContext, harden

    built = []
    real = attacks_api.make_attack

    def spy(name, model, *a, **kw):
        atk = real(name, model, *a, **kw)
        built.append((name, atk.params()))
        return atk

    monkeypatch.setattr(attacks_api, "make_attack", spy)
    cfg = parse_config({"dataset": "digits", "method": "dare_adv",
                        "tune": {"epochs": 1, "adv_eps": 0.03}})
    harden(StageContext(mined_job, cfg), "dare_adv")
    assert built and {n for n, _ in built} == {"pgd"}
    assert all(math.isclose(p["eps"], 0.03) for _, p in built)
