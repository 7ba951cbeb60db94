"""The whole engine through its stage runner and the ``dare harden`` command line."""
import json
import shutil

import onnxruntime as ort
import pytest
import torch

from worker.cli import main as cli
from worker.engine.config import parse_config
from worker.engine.reference.train import train_reference
from worker.engine.stages import CONTROLS, StageContext, run_stage, stage_names

SMALL = {"evaluation": {"n_samples": 40, "attacks": ["fgsm", "pgd", "jsma"]},
         "tune": {"epochs": 3}, "baselines": {"epochs": 1, "max_train": 100, "lr_grid": [1e-3]},
         "selection": {"dare": {"epochs": [3], "lr": [3e-3], "history_fraction": [0.5]},
                       "adversarial": {"epochs": [1], "lr": [1e-3]}}}


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("subject")
    train_reference("mlp", "digits", 6, out, seed=0)
    return out


def _job(tmp_path, subject, fmt="pt2"):
    (tmp_path / "inputs").mkdir(parents=True)
    shutil.copyfile(subject / f"model.{fmt}", tmp_path / "inputs" / f"model.{fmt}")
    shutil.copyfile(subject / "history.zip", tmp_path / "inputs" / "history.zip")
    return tmp_path


def test_cli_harden_writes_every_artifact_of_the_contract(subject, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(["harden", "--model", str(subject / "model.onnx"), "--history", str(subject / "history.zip"),
              "--dataset", "digits", "--out", str(out), "--config", json.dumps(SMALL)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["artifacts"]) == {"hardened.onnx", "hardened.safetensors", "report.json", "report.html"}
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1
    assert set(report["attacks"]) == {"fgsm", "pgd", "jsma"}
    assert report["clean_accuracy"]["within_budget"] is True
    assert report["mining"]["mined"] > 0 and 0 < report["slicing"]["key_synapse_fraction"] < 1
    per_class = report["mining"]["mined_per_class"]
    assert len(per_class) == 10 and sum(per_class) == report["mining"]["mined"]
    assert report["slicing"]["frozen_share"]["overall"] == pytest.approx(0.05, abs=0.02)
    assert {"slice", "mine", "tune", "evaluate"} <= set(report["timings_s"])
    # the hardened ONNX runs in onnxruntime and is not the original
    x = torch.rand(4, 1, 8, 8).numpy()
    sess = ort.InferenceSession(str(out / "hardened.onnx"))
    orig = ort.InferenceSession(str(subject / "model.onnx"))
    a = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    b = orig.run(None, {orig.get_inputs()[0].name: x})[0]
    assert a.shape == (4, 10) and abs(a - b).max() > 0


def test_cli_refuses_bad_input_with_a_code(subject, tmp_path, capsys):
    rc = cli(["harden", "--model", str(subject / "model.pt2"), "--history", str(subject / "history.zip"),
              "--dataset", "digits", "--out", str(tmp_path), "--config", '{"q": "lots"}'])
    assert rc == 2
    assert "invalid_config" in capsys.readouterr().err


def test_a_finished_stage_is_not_run_again(subject, tmp_path):
    wd = _job(tmp_path, subject)
    ctx = StageContext(wd, parse_config({**SMALL, "dataset": "digits"}))
    for name in ("validate", "slice", "mine", "tune"):
        first = run_stage(name, ctx)
    tuned = (wd / "state" / "tuned.safetensors").read_bytes()
    mtime = (wd / "state" / "tuned.safetensors").stat().st_mtime_ns
    assert run_stage("tune", ctx) == first
    assert (wd / "state" / "tuned.safetensors").stat().st_mtime_ns == mtime
    assert (wd / "state" / "tuned.safetensors").read_bytes() == tuned


def test_compare_and_auto_pick_the_recommended_method(subject, tmp_path):
    wd = _job(tmp_path, subject)
    cfg = parse_config({**SMALL, "dataset": "digits", "method": "auto",
                        "evaluation": {"n_samples": 30, "attacks": ["fgsm", "pgd"]}})
    assert stage_names(cfg) == ["validate", "slice", "mine", "tune", "compare", "export", "evaluate"]
    ctx = StageContext(wd, cfg)
    for name in stage_names(cfg):
        run_stage(name, ctx)
    report = json.loads((wd / "artifacts" / "report.json").read_text())
    comp = report["comparison"]
    assert {"dare", "dare_adv", "at_fgsm", "at_pgd_online", "dare_s", "dare_sl", "dare_rand",
            "finetune_mined", "weight_noise"} <= set(comp["methods"])
    assert comp["recommended"] not in CONTROLS  # measured beside the methods, never recommended
    # The choice recomputed from the validation rows (never from the test figures), the
    # original's validation clean accuracy and the configured budget.
    sel = comp["selection"]
    orig, limit = sel["original"]["val_clean"], cfg.clean_drop_limit
    eligible = [m for m, r in sel["methods"].items()
                if orig - r["val_clean"] <= limit + 1e-12 and m not in CONTROLS]
    assert eligible
    best = max(sel["methods"][m]["val_robust"] for m in eligible)
    assert comp["recommended"] in eligible
    assert sel["methods"][comp["recommended"]]["val_robust"] == pytest.approx(best)
    ev = json.loads((wd / "state" / "evaluation.json").read_text())
    assert report["method"] == comp["recommended"]
    # auto ships the recommended method: the exported weights are that method's model
    shipped = (wd / "artifacts" / "hardened.safetensors").read_bytes()
    from safetensors.torch import load_file

    got = load_file(str(wd / "artifacts" / "hardened.safetensors"))
    want = load_file(str(wd / "state" / f"method_{comp['recommended']}.safetensors"))
    assert shipped and set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert report["clean_accuracy"]["hardened"] == ev["clean"][comp["recommended"]]


def test_every_method_trains_against_the_evaluations_budget(subject, tmp_path, monkeypatch):
    """One threat model per job: evaluation.eps (away from the dataset's 0.1) is the budget the
    adversarial-training baselines, the robust_training methods (TRADES, N-FGSM, AWP,
    dare_trades: their eps ramp ends there) and DARE-adv's PGD train against; tune.adv_eps still
    wins."""
    from worker.engine import attacks, robust_training
    from worker.engine.stages import harden

    made = []
    real = attacks.make_attack
    monkeypatch.setattr(attacks, "make_attack",
                        lambda name, m, **kw: made.append((name, kw.get("eps"))) or real(name, m, **kw))
    radii: dict[str, list] = {}  # the radius of every training batch's adversarial example

    def spy(fn, eps_at):
        def wrapped(*a, **kw):
            radii.setdefault(fn.__name__, []).append(a[eps_at])
            return fn(*a, **kw)
        return wrapped

    for fn, eps_at in (("trades_example", 2), ("nfgsm_example", 3), ("_pgd_example", 3)):
        monkeypatch.setattr(robust_training, fn, spy(getattr(robust_training, fn), eps_at))
    wd = _job(tmp_path, subject)
    ctx = StageContext(wd, parse_config({**SMALL, "dataset": "digits",
                                         "evaluation": {"eps": 0.05}}))
    harden(ctx, "at_pgd")
    harden(ctx, "at_pgd_online")
    assert made and set(made) == {("pgd", 0.05)}
    # AWP's single point is its grid's first base, PGD-AT (_pgd_example)
    for name, fn in (("trades", "trades_example"), ("nfgsm", "nfgsm_example"),
                     ("awp", "_pgd_example")):
        harden(ctx, name)
        assert max(radii.pop(fn)) == pytest.approx(0.05) and not radii, name
    made.clear()
    for name in ("validate", "slice", "mine"):
        run_stage(name, ctx)
    harden(ctx, "dare_trades")
    assert max(radii.pop("trades_example")) == pytest.approx(0.05) and not radii
    made.clear()
    harden(ctx, "dare_adv")
    assert made and {e for _, e in made} == {0.05}
    made.clear()
    ctx2 = StageContext(wd, parse_config({**SMALL, "dataset": "digits", "tune": {"epochs": 1, "adv_eps": 0.2},
                                          "evaluation": {"eps": 0.05}}))
    harden(ctx2, "dare_adv")
    assert made and {e for _, e in made} == {0.2}
