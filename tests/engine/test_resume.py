"""Training loops killed mid-stage resume from their last completed epoch, bit for bit.

Each test runs a loop (or a method's grid selection, or a stage) uninterrupted, then runs it
again but crashes it part-way through an epoch (an exception from the cancel hook, which the loops
poll before every batch, as a killed worker would stop), re-runs it on the same checkpoint
directory, and compares the final weights bitwise. The hooks count the batches each attempt
started, which gives the work redone.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.engine.test_evaluation import digits_and_model
from worker.engine.baselines import _fit
from worker.engine.config import TuneConfig, parse_config
from worker.engine.graph import analyze
from worker.engine.mining import mine_oracles
from worker.engine.profiling import profile
from worker.engine.resume import Resume
from worker.engine.slicing import slice_model
from worker.engine.stages import StageContext, run_stage, stage_names
from worker.engine.tuning import tune_dare, tune_full_model

from .tiny import trained


class Crash(Exception):
    """Stands for the worker dying: nothing after it in the attempt runs."""


class Hook:
    """A ``cancelled`` hook that counts its calls (one per batch) and crashes at call ``at``."""

    def __init__(self, at: int | None = None) -> None:
        self.calls, self.at = 0, at

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == self.at:
            raise Crash()
        return False


LOOPS = ("_fit", "tune_dare", "tune_full_model")


class Polls:
    """A ``cancelled`` hook that names every batch it is polled for: a training batch by its
    loop's checkpoint place (relative to ``base``) and epoch (0-based), any other batch (an
    attack's: generation, scoring) by the function running the attack. ``crash``: ``(place, epoch, k)``
    crashes at that epoch's k-th batch."""

    def __init__(self, base: Path, crash: tuple[str, int, int] | None = None) -> None:
        self.base, self.crash, self.seen = Path(base), crash, Counter()

    def __call__(self) -> bool:
        frame = sys._getframe(1)
        if frame.f_code.co_name in LOOPS:
            place = frame.f_locals["resume"].root.relative_to(self.base).as_posix()
            key = (place, frame.f_locals["epoch"])
        else:  # run_batched: named by its caller
            key = ("attack", frame.f_back.f_code.co_name)
        self.seen[key] += 1
        if self.crash is not None and (*key, self.seen[key]) == self.crash:
            raise Crash()
        return False


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _no_seconds(obj):
    """``obj`` without its timings (wall-clock: they differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _no_seconds(v) for k, v in obj.items()
                if not k.endswith(("seconds", "_s"))}
    if isinstance(obj, list):
        return [_no_seconds(v) for v in obj]
    return obj


# --- DARE's masked tuning ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def dare_inputs():
    gm, history, data = trained()
    info = analyze(gm)
    sliced = slice_model(info, profile(info, data.x_train, data.y_train, 10), 0.95, 1)
    mined = mine_oracles(gm, sliced.cut_node, info.output_node, history, data.x_val, data.y_val)
    return gm, sliced, mined


def _tune(dare_inputs, cfg, hook, resume=None, full_model=False, on_epoch=lambda e, m: None):
    gm, sliced, mined = dare_inputs
    torch.manual_seed(0)  # as run_stage does before every attempt
    if full_model:  # DARE-sl: every weight, no slicing
        return tune_full_model(gm, mined, cfg, seed=0, cancelled=hook, resume=resume,
                               on_epoch=on_epoch)
    return tune_dare(gm, sliced, mined, cfg, seed=0, cancelled=hook, resume=resume,
                     on_epoch=on_epoch)


@pytest.mark.parametrize("full_model", [False, True], ids=["dare", "dare_sl"])
def test_dare_tuning_resumes_bitwise_and_redoes_under_one_epoch(dare_inputs, tmp_path,
                                                                full_model):
    cfg = TuneConfig(epochs=4, lr=3e-3, batch_size=16)
    full = Hook()
    ref, ref_info = _tune(dare_inputs, cfg, full, full_model=full_model)
    per_epoch = full.calls // cfg.epochs
    assert full.calls == per_epoch * cfg.epochs and per_epoch > 2

    crash_at = 2 * per_epoch + per_epoch // 2  # inside the third epoch
    with pytest.raises(Crash):
        _tune(dare_inputs, cfg, Hook(crash_at), Resume(tmp_path), full_model)
    assert list(tmp_path.rglob("checkpoint.pt"))
    again = Hook()
    tuned, info = _tune(dare_inputs, cfg, again, Resume(tmp_path), full_model)

    assert _equal_states(tuned, ref)
    assert (info.get("steps"), info["loss_first"], info["loss_last"]) == \
        (ref_info.get("steps"), ref_info["loss_first"], ref_info["loss_last"])
    redone = crash_at + again.calls - full.calls  # batches run twice (the crashing one counted)
    assert 0 < redone <= per_epoch
    assert again.calls == 2 * per_epoch  # the last two epochs only


def test_the_callers_state_is_saved_after_each_epochs_on_epoch(dare_inputs, tmp_path):
    """What ``on_epoch`` collected up to the last checkpoint comes back with it: every epoch
    is seen exactly once over the two attempts, as in an uninterrupted run."""
    cfg = TuneConfig(epochs=4, lr=3e-3, batch_size=16)
    seen: list[int] = []

    def on_epoch(e, m):
        seen.append(e)

    def put(state):
        seen[:] = state["seen"]

    resume = Resume(tmp_path).with_state(lambda: {"seen": list(seen)}, put)
    count = Hook()
    _tune(dare_inputs, cfg, count)
    per_epoch = count.calls // cfg.epochs
    with pytest.raises(Crash):
        _tune(dare_inputs, cfg, Hook(2 * per_epoch + 1), resume, on_epoch=on_epoch)
    assert seen == [1, 2]
    seen[:] = [99]  # the crashed process's memory is gone
    _tune(dare_inputs, cfg, Hook(), resume, on_epoch=on_epoch)
    assert seen == [1, 2, 3, 4]


def test_a_checkpoint_of_another_config_is_discarded(dare_inputs, tmp_path):
    cfg_a = TuneConfig(epochs=3, lr=3e-3, batch_size=16)
    cfg_b = TuneConfig(epochs=3, lr=1e-3, batch_size=16)
    with pytest.raises(Crash):
        _tune(dare_inputs, cfg_a, Hook(30), Resume(tmp_path))
    assert list(tmp_path.rglob("checkpoint.pt"))
    b_hook = Hook()
    tuned, _ = _tune(dare_inputs, cfg_b, b_hook, Resume(tmp_path))
    ref_hook = Hook()
    ref, _ = _tune(dare_inputs, cfg_b, ref_hook)
    assert _equal_states(tuned, ref)
    assert b_hook.calls == ref_hook.calls  # started over


def test_a_checkpoint_is_deleted_when_its_key_differs_or_it_is_torn(tmp_path):
    Resume(tmp_path / "a", key="config-1").child("loop", 1).save({"epoch": 3})
    assert Resume(tmp_path / "a", key="config-1").child("loop", 1).load() == {"epoch": 3}
    stale = Resume(tmp_path / "a", key="config-2").child("loop", 1)
    assert stale.load() is None and not stale.root.exists()

    # a torn file (a disk error) is no checkpoint either: the loop starts over
    ck = Resume(tmp_path / "torn")
    ck.root.mkdir()
    ck.path.write_bytes(b"not a checkpoint")
    assert ck.load() is None and not ck.path.exists()


# --- the shared baseline loop, with an adversary that draws from the global generator ---------

def _noisy(idx, xb, yb):
    """An online 'adversary' drawing from the global RNG (as random-start attacks do)."""
    return (xb + 0.1 * torch.rand_like(xb)).clamp(0, 1)


def _fit_run(model, splits, hook, resume=None):
    m = copy.deepcopy(model)
    torch.manual_seed(0)  # as run_stage does before every attempt
    fit = _fit(m, splits.x_train[:320], splits.y_train[:320], lr=1e-3, epochs=4, batch_size=32,
               adv_fraction=0.5, adversary=_noisy, seed=0, cancelled=hook, resume=resume)
    return m, fit


def test_fit_restores_the_global_generator_too(tmp_path):
    splits, model = digits_and_model()
    full = Hook()
    ref, ref_fit = _fit_run(model, splits, full)
    assert full.calls == 40
    with pytest.raises(Crash):
        _fit_run(model, splits, Hook(25), Resume(tmp_path))
    again = Hook()
    m, fit = _fit_run(model, splits, again, Resume(tmp_path))
    assert _equal_states(m, ref)
    assert (fit["final_loss"], fit["steps"]) == (ref_fit["final_loss"], ref_fit["steps"])
    assert again.calls == 20  # epochs 3 and 4


# --- a method's grid selection and a compare stage, through the stage runner -------------------

GRIDS = {"dare": {"epochs": [1, 3], "lr": [3e-3], "history_fraction": [1.0]},
         "adversarial": {"epochs": [1, 3], "lr": [2e-3, 5e-4], "adv_fraction": [0.5]}}
AUTO = {"dataset": "digits", "method": "auto", "baselines": {"max_train": 320},
        "evaluation": {"n_samples": 30, "attacks": ["fgsm"], "eps": 0.1},
        "selection": {**GRIDS, "methods": ["dare", "dare_adv", "at_pgd_online"], "n_val": 60}}


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from worker.engine.reference.train import train_reference

    out = tmp_path_factory.mktemp("subject")
    train_reference("mlp", "digits", 6, out, seed=0)
    return out


def _job_upto(tmp_path_factory, subject, cfg, upto):
    wd = tmp_path_factory.mktemp("job")
    (wd / "inputs").mkdir()
    for f in ("model.pt2", "history.zip"):
        shutil.copyfile(subject / f, wd / "inputs" / f)
    ctx = StageContext(wd, parse_config(cfg))
    for name in stage_names(ctx.config):
        run_stage(name, ctx)
        if name == upto:
            break
    return wd


@pytest.fixture(scope="module")
def auto_job(subject, tmp_path_factory):
    """An auto job run up to its tune stage (which chose DARE's model): compare is next."""
    return _job_upto(tmp_path_factory, subject, AUTO, "tune")


def _select(wd, spec, hook):
    from worker.engine.selection import select_method
    from worker.engine.stages import _selection_setup

    ctx = StageContext(wd, parse_config(AUTO), cancelled=hook)
    job, judge, original = _selection_setup(ctx)
    judge.cancelled = lambda: False  # count the training's batches and the generation's only
    return select_method(spec, job, judge, original["val_clean"], ctx.config.clean_drop_limit,
                         resume=job.method_resume(spec.name))


def _at_fgsm(wd, hook):
    from worker.engine.methods import REGISTRY

    return _select(wd, REGISTRY["at_fgsm"], hook)


def _noisy_runner(job, point, on_epoch, progress):
    """A method whose adversary draws from the global generator (as a random start that is not
    seeded per call does)."""
    xs, ys = job.train_subset()
    m = copy.deepcopy(job.original)
    fit = _fit(m, xs, ys, lr=point["lr"], epochs=point["epochs"], batch_size=64,
               adv_fraction=point["adv_fraction"], adversary=_noisy, seed=job.config.seed,
               cancelled=job.ctx.cancelled, on_epoch=on_epoch, resume=job.resume)
    return m, {"epochs": point["epochs"], "final_loss": fit["final_loss"]}


def _noisy_spec():
    from worker.engine.methods import MethodSpec

    return MethodSpec("noisy", "adversarial", ("adv_fraction",), _noisy_runner,
                      cost=lambda job, probe, grid: 0.0)


def test_a_grid_selection_resumes_inside_its_second_combination(auto_job, tmp_path):
    """at_fgsm's grid (two learning rates, scored after epochs 1 and 3), crashed at the third
    batch of the second combination's second epoch: the re-run trains neither the offline
    examples nor the first combination again, only the part of the epoch that was lost, and
    keeps the score of the second combination's first epoch taken before the crash."""
    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    for d in (plain, crashed):
        shutil.copytree(auto_job, d)
    full = Polls(plain / "state" / "resume")
    ref, ref_info = _at_fgsm(plain, full)
    fit1 = "at_fgsm/select/combo1/fit"
    assert full.seen[fit1, 1] == 5 and full.seen["attack", "offline_examples"] == 2

    first = Polls(crashed / "state" / "resume", crash=(fit1, 1, 3))
    with pytest.raises(Crash):
        _at_fgsm(crashed, first)
    again = Polls(crashed / "state" / "resume")
    model, info = _at_fgsm(crashed, again)

    assert _equal_states(model, ref)
    assert _no_seconds(info) == _no_seconds(ref_info)
    assert [(r["lr"], r["epochs"]) for r in info["grid"]] == [(5e-4, 1), (5e-4, 3), (2e-3, 1),
                                                              (2e-3, 3)]
    redone = first.seen + again.seen - full.seen
    del redone["attack", "score"]  # the original's scores, taken again by each attempt's setup
    assert redone == Counter({(fit1, 1): 3})  # neither the examples nor combination 0 again
    assert not full.seen - (first.seen + again.seen)


def test_a_grid_resumed_between_combinations_goes_on_with_the_global_generator(auto_job,
                                                                             tmp_path):
    """A method drawing from the global generator, crashed in the first epoch of its second
    combination: nothing of that combination was checkpointed, so the generator's state comes
    from the record of the finished first one."""
    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    for d in (plain, crashed):
        shutil.copytree(auto_job, d)
    ref, ref_info = _select(plain, _noisy_spec(), Polls(plain / "state" / "resume"))
    first = Polls(crashed / "state" / "resume", crash=("noisy/select/combo1/fit", 0, 2))
    with pytest.raises(Crash):
        _select(crashed, _noisy_spec(), first)
    model, info = _select(crashed, _noisy_spec(), Polls(crashed / "state" / "resume"))
    assert _equal_states(model, ref)
    assert _no_seconds(info) == _no_seconds(ref_info)


def test_a_methods_selection_starts_from_the_seed_whatever_ran_before(auto_job, tmp_path):
    """So a compare that loads an earlier method's model from state/ (a re-run) trains the next
    one as a compare that trained both (its draws from the global generator) would."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(auto_job, d)
    ref, _ = _select(a, _noisy_spec(), Hook())
    torch.rand(1000)  # another method's draws
    model, _ = _select(b, _noisy_spec(), Hook())
    assert _equal_states(model, ref)


def test_a_compare_resumed_inside_a_method_chooses_the_same_model(auto_job, tmp_path):
    """compare trains dare_adv, then at_pgd_online, crashed in at_pgd_online's second
    combination, second epoch (after its first was scored). The re-run loads dare_adv's model
    from state/ and goes on inside at_pgd_online; the choice, every method's model and the
    selection's scores equal the uninterrupted compare's."""
    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    for d in (plain, crashed):
        shutil.copytree(auto_job, d)
    cfg = parse_config(AUTO)
    full = Polls(plain / "state" / "resume")
    ref = run_stage("compare", StageContext(plain, cfg, cancelled=full))
    fit1 = "at_pgd_online/select/combo1/fit"
    assert full.seen[fit1, 1] == 5

    first = Polls(crashed / "state" / "resume", crash=(fit1, 1, 2))
    with pytest.raises(Crash):
        run_stage("compare", StageContext(crashed, cfg, cancelled=first))
    assert (crashed / "state" / "method_dare_adv.safetensors").exists()
    assert not (crashed / "state" / "resume" / "dare_adv").exists()  # saved: checkpoints gone
    assert list((crashed / "state" / "resume" / "at_pgd_online").rglob("checkpoint.pt"))
    again = Polls(crashed / "state" / "resume")
    out = run_stage("compare", StageContext(crashed, cfg, cancelled=again))

    assert out["chosen"] == ref["chosen"]
    for m in AUTO["selection"]["methods"]:
        w, meta = f"state/method_{m}.safetensors", f"state/method_{m}.json"
        assert (crashed / w).read_bytes() == (plain / w).read_bytes(), m
        assert _no_seconds(json.loads((crashed / meta).read_text())) == \
            _no_seconds(json.loads((plain / meta).read_text())), m  # every grid point's scores
    sel, ref_sel = (json.loads((d / "state" / "selection.json").read_text())
                    for d in (crashed, plain))
    assert _no_seconds(sel["methods"]) == _no_seconds(ref_sel["methods"])
    training = Counter({k: v for k, v in (first.seen + again.seen - full.seen).items()
                        if k[0] != "attack"})
    assert training == Counter({(fit1, 1): 2})  # no epoch of any method done twice
    assert not (crashed / "state" / "resume").exists()  # removed once the stage is done


SMALL = {"dataset": "digits", "tune": {"epochs": 4},
         "evaluation": {"n_samples": 40, "attacks": ["fgsm"]}}


@pytest.fixture(scope="module")
def mined_job(subject, tmp_path_factory):
    return _job_upto(tmp_path_factory, subject, SMALL, "mine")


def test_a_re_run_tune_stage_resumes_and_cleans_up(mined_job, tmp_path):
    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    for d in (plain, crashed):
        shutil.copytree(mined_job, d)
    run_stage("tune", StageContext(plain, parse_config(SMALL)))

    with pytest.raises(Crash):
        run_stage("tune", StageContext(crashed, parse_config(SMALL), cancelled=Hook(20)))
    assert list((crashed / "state" / "resume").rglob("checkpoint.pt"))
    summary = run_stage("tune", StageContext(crashed, parse_config(SMALL)))

    tuned = "state/tuned.safetensors"
    assert (crashed / tuned).read_bytes() == (plain / tuned).read_bytes()
    assert summary["loss_last"] == json.loads(
        (plain / "state" / "tune.done.json").read_text())["summary"]["loss_last"]
    assert not (crashed / "state" / "resume").exists()  # removed once the stage is done


# --- the adversarial fine-tuning methods (robust_training) go through the same loop ---------------

@pytest.mark.parametrize("method,extra", [("trades", {"beta": 6.0}), ("nfgsm", {}),
                                          ("awp", {"awp_base": "trades"})])
def test_robust_fine_tuning_resumes_bitwise(tmp_path, method, extra):
    from worker.engine.config import RobustConfig
    from worker.engine.robust_training import fine_tune

    splits, model = digits_and_model()
    xs, ys = splits.x_train[:160], splits.y_train[:160]
    point = {"epochs": 3, "lr": 1e-3, **extra}

    def run(hook, resume=None):
        torch.manual_seed(0)
        return fine_tune(model, xs, ys, method, point, RobustConfig(), eps=0.1, ramp_epochs=1,
                         batch_size=32, dataset="digits", seed=0, cancelled=hook, resume=resume)

    full = Hook()
    ref, _ = run(full)
    with pytest.raises(Crash):  # in the last epoch: the first two are checkpointed
        run(Hook(full.calls - 2), Resume(tmp_path))
    again = Hook()
    m, _ = run(again, Resume(tmp_path))
    assert _equal_states(m, ref)  # AWP's perturbation was out of the weights when they were saved
    assert again.calls <= full.calls // 3 + 1  # only the last epoch was trained again
