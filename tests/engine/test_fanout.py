"""compare in parts (plan, one method at a time, select), as the service fans it out over
workers: each method trained in its own process, in the reverse order, gives the same models,
the same choice and the same evaluation as the whole stage in one process."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worker.engine.config import parse_config
from worker.engine.reference.train import train_reference
from worker.engine.stages import PLAN, StageContext, method_run, run_stage, stage_names

REPO = Path(__file__).resolve().parents[2]
METHODS = ["dare", "at_fgsm", "weight_noise"]  # weight_noise is made from dare's chosen model
CONFIG = {"method": "auto", "dataset": "digits", "seed": 3,
          "evaluation": {"n_samples": 30, "attacks": ["fgsm", "pgd"], "eps": 0.1},
          "baselines": {"max_train": 120},
          "selection": {"methods": METHODS,
                        "dare": {"epochs": [1, 2], "lr": [3e-3], "history_fraction": [1.0]},
                        "adversarial": {"epochs": [1], "lr": [1e-3, 3e-3]}}}
UNTIL_COMPARE = ["validate", "slice", "mine", "tune"]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("subject")
    train_reference("mlp", "digits", 6, out, seed=0)
    return out


def _job(path: Path, subject: Path) -> StageContext:
    (path / "inputs").mkdir(parents=True)
    for f in ("model.pt2", "history.zip"):
        shutil.copyfile(subject / f, path / "inputs" / f)
    return StageContext(path, parse_config(CONFIG))


def _method_in_own_process(wd: Path, m: str) -> None:
    code = ("import json, sys; from pathlib import Path\n"
            "from worker.engine.config import parse_config\n"
            "from worker.engine.stages import StageContext, method_run, run_stage\n"
            "ctx = StageContext(Path(sys.argv[1]), parse_config(json.loads(sys.argv[2])))\n"
            "run_stage(method_run(sys.argv[3]), ctx)\n")
    subprocess.run([sys.executable, "-c", code, str(wd), json.dumps(CONFIG), m], cwd=REPO,
                   check=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                    "PATH": "/usr/bin:/bin"})


def _without_times(obj):
    """Everything but the wall-clock figures (seconds, elapsed_s, timings_s), at any depth."""
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items()
                if k not in ("seconds", "elapsed_s", "timings_s")}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def test_methods_trained_apart_give_the_in_process_result(subject, tmp_path):
    whole = _job(tmp_path / "whole", subject)
    for name in stage_names(whole.config):
        run_stage(name, whole)

    parts = _job(tmp_path / "parts", subject)
    for name in UNTIL_COMPARE:
        run_stage(name, parts)
    plan = run_stage(PLAN, parts)
    assert plan["methods"] == METHODS and plan["needs"] == {"dare": [], "at_fgsm": [],
                                                            "weight_noise": ["dare"]}
    torch.manual_seed(12345)  # this process's random state must not reach any method
    for m in ("at_fgsm", "dare", "weight_noise"):
        _method_in_own_process(parts.workdir, m)
    for name in ("compare", "export", "evaluate"):
        run_stage(name, parts)

    a, b = whole.path("state"), parts.path("state")
    for m in METHODS:
        wa, wb = load_file(str(a / f"method_{m}.safetensors")), load_file(str(b / f"method_{m}.safetensors"))
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), m
    sa = json.loads((a / "selection.json").read_text())
    sb = json.loads((b / "selection.json").read_text())
    assert sa["methods"].keys() == set(METHODS) and _without_times(sa) == _without_times(sb)
    ea = json.loads((a / "evaluation.json").read_text())
    eb = json.loads((b / "evaluation.json").read_text())
    assert ea["timings_s"] and _without_times(ea) == _without_times(eb)
    ha = load_file(str(whole.path("artifacts", "hardened.safetensors")))
    hb = load_file(str(parts.path("artifacts", "hardened.safetensors")))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    # a method's part run again is a no-op that returns its recorded result
    assert run_stage(method_run("at_fgsm"), parts)["method"] == "at_fgsm"
    assert sorted(p.name for p in b.glob(".*.tmp")) == []  # no half-written file left behind


def test_a_method_outside_the_plan_is_refused(subject, tmp_path):
    ctx = _job(tmp_path / "job", subject)
    for name in UNTIL_COMPARE:
        run_stage(name, ctx)
    run_stage(PLAN, ctx)
    with pytest.raises(ValueError, match="dare_s"):
        run_stage(method_run("dare_s"), ctx)
