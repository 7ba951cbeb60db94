"""evaluate()'s bookkeeping on a model whose every answer is known in advance.

The subject is a mean-threshold classifier on 2x2 grey images: class 1 when the image's mean is
above ``t``. Its gradient has the same sign at every pixel, so FGSM moves each image's mean by
exactly eps, and a planted minimal attack or AutoAttack can be told which points to break. That
makes every figure of the result computable by hand: which points the minimal protocol keeps,
each model's transfer and adaptive scores, the perturbation sizes and their curve, the L2
statistics, the AutoAttack ratios, and the progress meter's total (every unit of work ticked
once, none left over).
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from worker.engine import attacks, evaluation
from worker.engine.attacks import autoattack
from worker.engine.config import EvaluationConfig
from worker.engine.data import Splits
from worker.engine.evaluation import (_Meter, accuracy, attack_kwargs, evaluate, l2_stats,
                                      model_device, predict, run_batched, run_minimal_batched)


class Threshold(nn.Module):
    """Class 1 when the image's mean is above ``t``, else class 0 (logits 20 * (mean - t))."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(float(t)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).mean(1)
        return torch.stack([self.t - s, s - self.t], 1) * 20


def _images(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def _splits(values, labels) -> Splits:
    x, y = _images(values), torch.tensor(labels)
    return Splits("digits", x, y, x, y, x, y, 2)


def _means(x: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in x.flatten(1).mean(1).tolist()]


# ----------------------------------------------------------------- the small helpers


def test_a_parameterless_model_lives_on_the_cpu():
    assert model_device(nn.Flatten()) == torch.device("cpu")
    assert model_device(Threshold(0.5)) == torch.device("cpu")


def test_predicting_and_scoring_an_empty_or_single_point_set():
    m = Threshold(0.5)
    empty = predict(m, _images([])[:0])
    assert empty.shape == (0,) and empty.dtype == torch.long
    assert accuracy(m, _images([0.7]), torch.tensor([1])) == 1.0  # one point is a set
    with pytest.raises(ValueError, match="empty"):
        accuracy(m, _images([])[:0], torch.tensor([], dtype=torch.long))


def test_the_batched_runners_return_empty_results_of_the_right_kind():
    m = Threshold(0.5)
    x, y = _images([])[:0], torch.tensor([], dtype=torch.long)
    assert run_batched(lambda a, b: a, x, y, batch_size=4, device="cpu").shape == (0, 1, 2, 2)
    adv, ok = run_minimal_batched("fgsm", m, x, y, batch_size=4)
    assert adv.shape == (0, 1, 2, 2) and ok.shape == (0,) and ok.dtype == torch.bool
    # and on one point, left to its defaults (nothing cancels it)
    adv, ok = run_minimal_batched("fgsm", m, _images([0.6]), torch.tensor([1]), batch_size=4)
    assert ok.tolist() == [True] and _means(adv)[0] <= 0.5  # a tie is class 0


def test_the_linf_budget_goes_to_the_linf_attacks_only_and_only_when_set():
    assert attack_kwargs("fgsm", 0.2) == {"eps": 0.2}
    assert attack_kwargs("cw", 0.2) == {} and attack_kwargs("jsma", 0.2) == {}
    assert attack_kwargs("fgsm", None) == {}


def test_the_meter_reports_done_over_total_and_never_passes_one():
    seen = []
    m = _Meter(4, seen.append)
    m.tick(1)
    m.tick(2)
    m.tick(3)  # more than is left: clamped at the total
    assert seen == [0.25, 0.75, 1.0]
    seen.clear()
    m = _Meter(0, seen.append)  # nothing to do: a total of one unit, not a division by zero
    m.tick(0)
    m.tick(1)
    assert seen == [0.0, 1.0]


def test_the_l2_statistics_count_only_the_successful_perturbations():
    m = Threshold(0.5)
    x, y = _images([0.4] * 4), torch.zeros(4, dtype=torch.long)
    # means 0.55, 0.6 and 0.7 cross the threshold (L2 0.3, 0.4, 0.6); 0.0 does not (L2 0.8)
    x_adv = _images([0.55, 0.6, 0.7, 0.0])
    s = l2_stats(m, x, x_adv, y, batch_size=2)
    assert s["n_successful"] == 3
    assert (s["q1"], s["median"], s["q3"]) == pytest.approx((0.35, 0.4, 0.5), abs=1e-6)
    none = l2_stats(m, x, x_adv[3:].expand(4, -1, -1, -1), y, batch_size=2)
    assert none == {"n_successful": 0, "median": None, "q1": None, "q3": None}


# ----------------------------------------------------------------- the progress meter's total


@pytest.fixture
def meters(monkeypatch):
    """Every _Meter evaluate() makes, with the units ticked into it (unclamped)."""
    made = []

    class Spy(_Meter):
        def __init__(self, total, progress):
            super().__init__(total, progress)
            self.asked, self.units = total, 0.0
            made.append(self)

        def tick(self, units):
            self.units += units
            super().tick(units)

    monkeypatch.setattr(evaluation, "_Meter", Spy)
    return made


# 25 points in batches of 10 (a short last batch); 3 of them labelled against the model, so the
# minimal protocol keeps fewer than it attacks
_VALUES = [0.05 + 0.036 * i for i in range(25)]
_LABELS = [int(v > 0.5) ^ (i % 9 == 4) for i, v in enumerate(_VALUES)]


@pytest.mark.parametrize("protocol, adaptive, names", [
    ("fixed_eps", True, ["fgsm", "pgd"]), ("fixed_eps", False, ["fgsm"]),
    ("minimal", True, ["fgsm"]), ("minimal", False, ["fgsm", "autoattack"]),
    ("minimal", True, ["autoattack", "fgsm"])])
def test_every_unit_of_work_is_ticked_once(meters, protocol, adaptive, names):
    """The meter's total is exactly the work done: progress neither stalls below 1 nor reaches
    it early (a wrong total or a tick counted twice would show as a difference here)."""
    splits = _splits(_VALUES, _LABELS)
    cfg = EvaluationConfig(protocol=protocol, n_samples=25, attacks=names, adaptive=adaptive,
                           batch_size=10)
    seen = []
    evaluate(Threshold(0.5), {"a": Threshold(0.45), "b": Threshold(0.6)}, splits, cfg,
             seed=0, progress=seen.append)
    (meter,) = meters
    assert meter.units == meter.asked > 0
    assert seen[-2:] == [1.0, 1.0] and max(seen[:-2]) < 1.0 and seen == sorted(seen)


# ----------------------------------------------------------------- fixed_eps, by hand


def test_fixed_eps_figures_by_hand():
    """FGSM at eps 0.15 moves each mean by exactly 0.15 towards the wrong side."""
    values = [0.40, 0.45, 0.30, 0.55, 0.60, 0.90, 0.95]
    labels = [0, 0, 1, 1, 1, 0, 1]  # the model gets points 2 and 5 wrong
    splits = _splits(values, labels)
    cfg = EvaluationConfig(n_samples=7, attacks=["fgsm", "cw"], eps=0.15, batch_size=3,
                           cw_l2_radius=0.05)
    t0 = time.perf_counter()
    res = evaluate(Threshold(0.5), {"low": Threshold(0.3), "high": Threshold(0.58)}, splits, cfg,
                   seed=0)
    wall = time.perf_counter() - t0
    fgsm = res["attacks"]["fgsm"]
    # adversarial means: 0.55 0.60 0.15 0.40 0.45 1.0 (clamped) 0.80
    # the original: predictions 1 1 0 0 0 1 1 against labels 0 0 1 1 1 0 1
    assert fgsm["original_accuracy"] == pytest.approx(1 / 7)
    assert fgsm["changed_predictions"] == 4  # points 0, 1, 3 and 4 changed class
    # transfer: the same examples scored by the other models
    assert fgsm["per_model"]["low"]["transfer_er"] == pytest.approx(3 / 7)  # 3, 4, 6 right
    assert fgsm["per_model"]["high"]["transfer_er"] == pytest.approx(2 / 7)  # 0 and 6 right
    # adaptive: FGSM against any threshold model moves each mean the same way (the side is set
    # by the label), so here adaptive equals transfer; that the attack is built against each
    # model is test_behaviours' the_adaptive_attack_is_built_against_each_hardened_model
    assert fgsm["per_model"]["high"]["adaptive_accuracy"] == pytest.approx(2 / 7)
    assert fgsm["per_model"]["low"]["adaptive_accuracy"] == pytest.approx(3 / 7)
    assert "l2_perturbation" not in fgsm and "l2_perturbation" not in fgsm["per_model"]["low"]
    # C&W is bounded: its statistics are reported for every model, at the configured radius
    cw = res["attacks"]["cw"]
    assert cw["params"]["l2_radius"] == 0.05 and set(cw["l2_perturbation"]) == {"original", "note"}
    assert all("l2_perturbation" in pm for pm in cw["per_model"].values())
    # a C&W example further than 0.05 (L2) from its image is scored on the clean image: the
    # threshold model needs >= 0.1 (2 x the mean's distance to 0.5 for the nearest point, 0.45)
    assert cw["original_accuracy"] == pytest.approx(5 / 7)
    assert res["threat_model"]["cw_l2_radius"] == 0.05
    # the checks of the threat model itself: the attacks changed predictions
    checks = {c["name"]: c for c in res["sanity_checks"]}
    assert checks["original: attacks_change_predictions"]["passed"]
    assert set(res["timings_s"]) == {"fgsm", "cw"}
    assert all(0 <= t <= wall for t in res["timings_s"].values())


def test_the_default_cw_radius_is_the_datasets_for_the_images_shape():
    x = _images([0.40, 0.60]).expand(-1, 3, -1, -1).clone()  # colour: C matters, not only H, W
    y = torch.tensor([0, 1])
    splits = Splits("digits", x, y, x, y, x, y, 2)
    res = evaluate(Threshold(0.5), {"same": Threshold(0.5)}, splits,
                   EvaluationConfig(n_samples=2, attacks=["cw"]), seed=0)
    # digits: the MNIST L2 budget 2.0 scaled by sqrt(12 / 784) for 3x2x2 images
    assert res["attacks"]["cw"]["params"]["l2_radius"] == pytest.approx(2.0 * (12 / 784) ** 0.5)


def test_the_sanity_checks_use_at_most_100_points():
    splits = _splits([0.1 + 0.8 * i / 100 for i in range(101)], [int(i > 50) for i in range(101)])
    res = evaluate(Threshold(0.5), {"same": Threshold(0.5)}, splits,
                   EvaluationConfig(n_samples=101, attacks=["fgsm"], adaptive=False), seed=0)
    assert res["sanity"]["key"]["n"] == 101 and res["sanity"]["key"]["n_sanity"] == 100


# ----------------------------------------------------------------- the minimal protocol, by hand


def _planted_minimal(monkeypatch):
    """A minimal attack that returns, for each model (known by its threshold) and image mean,
    a chosen example and success flag: the keep rule and the scores are then exact."""
    plan = {  # threshold -> {clean mean: (adversarial mean, success flag)}
        0.5: {0.1: (0.6, True), 0.2: (0.55, False), 0.3: (0.7, True), 0.7: (0.45, True),
              0.8: (0.8, True), 0.9: (0.1, True)},
        0.65: {0.1: (0.75, True), 0.7: (0.7, False)},
        0.05: {0.1: (0.1, False), 0.7: (0.02, True)},
        0.5001: {0.1: (0.55, True), 0.7: (0.45, True)},
    }

    def fake(name, model, x, y, batch_size=250):
        table = plan[round(float(model.t), 4)]
        out = [table[m] for m in _means(x)]
        return _images([a for a, _ in out]), torch.tensor([ok for _, ok in out])

    monkeypatch.setattr(attacks, "minimal_attack", fake)


def test_the_minimal_protocol_by_hand(monkeypatch):
    _planted_minimal(monkeypatch)
    splits = _splits([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0, 0, 1, 1, 1, 0])
    hardened = {"same": Threshold(0.5001), "high": Threshold(0.65), "low": Threshold(0.05)}
    res = evaluate(Threshold(0.5), hardened, splits,
                   EvaluationConfig(protocol="minimal", n_samples=6, attacks=["fgsm"]), seed=0)
    a = res["attacks"]["fgsm"]
    # kept: clean-correct (not 2, 5), flagged a success (not 1) and really misclassified by the
    # original (not 4, whose "adversarial" example is itself): points 0 and 3
    assert a["n"] == 2 and a["original_accuracy"] == 0.0
    pm = a["per_model"]
    # transfer of the kept examples (means 0.6, 0.45; labels 0, 1)
    assert pm["same"]["transfer_er"] == 0.0
    assert pm["high"]["transfer_er"] == 0.5  # 0.6 is class 0 for t 0.65
    assert pm["low"]["transfer_er"] == 0.5  # both class 1 for t 0.05
    # adaptive: right on the clean kept point and the attack on it failed
    assert pm["same"]["adaptive_accuracy"] == 0.0
    assert pm["high"]["adaptive_accuracy"] == 0.5  # the attack failed on 0.7
    assert pm["low"]["adaptive_accuracy"] == 0.0  # 0.1 is wrong clean, 0.7 was broken
    sizes = a["minimal_perturbation"]
    assert sizes["norm"] == "linf"
    assert sizes["original"]["n"] == 2 and sizes["original"]["median"] == pytest.approx(0.375)
    # a failed attack is an infinite size; a point wrong clean needs none
    assert pm["high"]["minimal_perturbation"]["failed"] == 1
    assert pm["high"]["minimal_perturbation"]["n"] == 2
    assert pm["low"]["minimal_perturbation"]["failed"] == 0
    assert pm["low"]["minimal_perturbation"]["q1"] == pytest.approx(0.17)  # of 0 and 0.68
    curve = sizes["curve"]
    # the largest finite size (0.68 in float32) rounded up to three digits
    assert curve["budget"][0] == 0.0 and 0.68 <= curve["budget"][-1] <= 0.681
    # robust accuracy at budget b: sizes strictly above b
    assert curve["original"][0] == 1.0 and curve["original"][-1] == 0.0
    assert curve["low"][0] == 0.5 and curve["low"][-1] == 0.0
    assert curve["high"][-1] == 0.5  # the failed attack's point stays robust at every budget
    # the minimal protocol changes no budget: no changed-predictions check is made of it
    assert not any(c["name"].endswith("attacks_change_predictions") for c in res["sanity_checks"])
    assert "autoattack" not in res["attacks"]


# ----------------------------------------------------------------- AutoAttack's figures


def _planted_autoattack(monkeypatch, calls):
    robust = {0.5: [1, 0, 1, 0, 0, 0, 0], 0.45: [1, 1, 1, 0, 0, 0, 0], 0.6: [0, 0, 0, 0, 0, 0, 0]}

    def fake(model, x, y, *, eps, version, seed, batch_size, device, tick, cancelled):
        t = round(float(model.t), 4)
        calls.append(t)
        tick(len(x))
        r = torch.tensor(robust[t], dtype=torch.bool)
        return {"robust": r, "x_adv": _images([0.9] * len(x)), "n_classes": 2,
                "breakdown": {"clean": 5 / 7, "apgd-ce": float(r.float().mean())},
                "checks": [{"name": "gradient_masking", "passed": True, "detail": ""}]}

    monkeypatch.setattr(autoattack, "run_autoattack", fake)


def test_autoattack_figures_are_counts_over_n(monkeypatch):
    calls = []
    _planted_autoattack(monkeypatch, calls)
    splits = _splits([0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.4], [0, 0, 1, 1, 1, 0, 1])
    res = evaluate(Threshold(0.5), {"a": Threshold(0.45), "b": Threshold(0.6)}, splits,
                   EvaluationConfig(n_samples=7, attacks=["autoattack"]), seed=0)
    aa = res["attacks"]["autoattack"]
    assert calls == [0.5, 0.45, 0.6]  # the original, then each hardened model on its own
    assert aa["original_accuracy"] == 2 / 7
    assert aa["changed_predictions"] == 5 - 2  # clean-correct 5/7 of 7, 2 still robust
    assert aa["per_model"]["a"]["adaptive_accuracy"] == 3 / 7
    assert aa["per_model"]["b"]["adaptive_accuracy"] == 0.0
    # transfer: the original's examples (all mean 0.9, class 1) scored by each model
    assert aa["per_model"]["a"]["transfer_er"] == pytest.approx(4 / 7)  # the label-1 points
    assert aa["per_model"]["a"]["breakdown"]["apgd-ce"] == pytest.approx(3 / 7)
    assert set(aa["breakdown"]) == {"original", "a", "b"}
    names = [c["name"] for c in res["sanity_checks"]]
    assert {"original: gradient_masking", "a: gradient_masking", "b: gradient_masking"} <= set(names)

    calls.clear()
    res = evaluate(Threshold(0.5), {"a": Threshold(0.45)}, splits,
                   EvaluationConfig(n_samples=7, attacks=["autoattack"], adaptive=False), seed=0)
    assert calls == [0.5]  # not adaptive: the original only
    pm = res["attacks"]["autoattack"]["per_model"]["a"]
    assert pm["adaptive_accuracy"] is None and pm["breakdown"] is None


def test_autoattack_is_not_run_under_the_minimal_protocol(monkeypatch):
    calls = []
    _planted_autoattack(monkeypatch, calls)
    _planted_minimal(monkeypatch)
    splits = _splits([0.1, 0.7], [0, 1])
    res = evaluate(Threshold(0.5), {"same": Threshold(0.5001)}, splits,
                   EvaluationConfig(protocol="minimal", n_samples=2, attacks=["autoattack", "fgsm"]),
                   seed=0)
    assert calls == [] and list(res["attacks"]) == ["fgsm"] and set(res["timings_s"]) == {"fgsm"}
