"""One threat model per job: every budget named with its source; checks that trip when the budget
cannot move a pixel or when no attack changes anything."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine import baselines
from worker.engine.config import BaselineConfig, EvaluationConfig
from worker.engine.data import Splits
from worker.engine.evaluation import evaluate
from worker.engine.threat import intensity_step, linf_budget

from .test_evaluation import digits_and_model


def _as_upload(splits) -> Splits:
    """The digits (grey levels 1/16 apart) as an uploaded .npz would arrive: no dataset name."""
    return Splits("upload", splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                  splits.x_test, splits.y_test, 10)


def test_intensity_step_of_quantised_and_8bit_data():
    splits, _ = digits_and_model()
    assert intensity_step(splits.x_test) == pytest.approx(1 / 16)
    assert intensity_step(torch.arange(256.0).view(1, 1, 16, 16) / 255) == pytest.approx(1 / 255)


def test_budget_source_config_dataset_or_derived():
    splits, _ = digits_and_model()
    x8 = torch.arange(256.0).view(1, 1, 16, 16) / 255
    assert linf_budget(0.2, "digits", splits.x_test)["source"].startswith("evaluation.eps")
    assert "digits dataset" in linf_budget(None, "digits", splits.x_test)["source"]
    derived = linf_budget(None, "upload", splits.x_test)
    assert derived["eps"] == pytest.approx(0.1) and "derived from the data" in derived["source"]
    up8 = linf_budget(None, "upload", x8)
    assert up8["eps"] == pytest.approx(8 / 255) and "8/255" in up8["source"]


def test_upload_gets_the_derived_budget_and_the_report_names_it():
    splits, model = digits_and_model()
    ev = evaluate(model, {"h": model}, _as_upload(splits), EvaluationConfig(attacks=["fgsm"], n_samples=10))
    assert ev["eps"] == pytest.approx(0.1)
    assert ev["attacks"]["fgsm"]["params"]["eps"] == pytest.approx(0.1)
    assert "derived from the data" in ev["threat_model"]["linf_source"]
    checks = {c["name"]: c for c in ev["sanity_checks"]}
    assert checks["original: linf_budget_not_below_intensity_step"]["passed"]
    assert checks["original: attacks_change_predictions"]["passed"]


def test_budget_below_one_grey_level_and_attacks_that_change_nothing_fail():
    """The hidden subject's case: 8x8 digits evaluated at 8/255 = 0.031 < 1/16."""
    splits, model = digits_and_model()
    ev = evaluate(model, {"h": model}, _as_upload(splits),
                  EvaluationConfig(attacks=["fgsm"], n_samples=10, eps=8 / 255))
    checks = {c["name"]: c for c in ev["sanity_checks"]}
    low = checks["original: linf_budget_not_below_intensity_step"]
    assert low["passed"] is False and "0.0625" in low["detail"]

    class Constant(nn.Module):  # gradients are zero, predictions never change
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.w.expand(x.shape[0], 10) + 0 * x.flatten(1)[:, :1]

    ev = evaluate(Constant(), {"h": Constant()}, splits,
                  EvaluationConfig(attacks=["fgsm", "pgd"], n_samples=10))
    checks = {c["name"]: c for c in ev["sanity_checks"]}
    dead = checks["original: attacks_change_predictions"]
    assert dead["passed"] is False and "fgsm 0" in dead["detail"]


def test_adversarial_training_uses_the_jobs_budget():
    splits, model = digits_and_model()
    cfg = BaselineConfig(epochs=1, lr_grid=[1e-3], max_train=20)
    _, info = baselines.adversarial_training(model, "fgsm", splits, cfg, eps=0.2)
    assert info["attack_params"]["eps"] == pytest.approx(0.2)
