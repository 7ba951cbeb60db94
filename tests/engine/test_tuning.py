import copy
import time

import pytest
import torch

from worker.engine.config import TuneConfig
from worker.engine.errors import Cancelled
from worker.engine.graph import analyze
from worker.engine.mining import mine_oracles
from worker.engine.profiling import profile
from worker.engine.slicing import full_slice, slice_model
from worker.engine.transform import build_mt
from worker.engine.tuning import tune_dare, tune_full_model

from .tiny import only_classes, trained


@pytest.fixture(scope="module")
def setup():
    gm, history, data = trained()
    info = analyze(gm)
    prof = profile(info, data.x_train, data.y_train, 10)
    res = slice_model(info, prof, 0.95, 1)
    mined = mine_oracles(gm, res.cut_node, info.output_node, history, data.x_val, data.y_val)
    return gm, history, data, info, prof, res, mined


def _acc(m, data):
    with torch.no_grad():
        return float((m(data.x_test).argmax(1) == data.y_test).float().mean())


def test_mined_tutors_beat_the_final_model(setup):
    gm, history, data, info, _, res, mined = setup
    window = history[len(history) // 2:]
    assert mined.window == [h.name for h in window]
    assert 0 < len(mined.y) < mined.candidates == len(data.x_val)
    with torch.no_grad():
        p_final = torch.softmax(gm(mined.x), 1)
    conf_final = p_final.gather(1, mined.y[:, None]).squeeze(1)
    conf_final[p_final.argmax(1) != mined.y] = 0
    for i, ck in enumerate(window):
        sel = mined.tutor == i
        if not sel.any():
            continue
        tutor_logits = mined.tutor_logits[sel]
        p = torch.softmax(tutor_logits, 1)
        assert (p.argmax(1) == mined.y[sel]).all()
        assert (p.gather(1, mined.y[sel][:, None]).squeeze(1) > conf_final[sel]).all()
    assert mined.target.shape == (len(mined.y), 32)


def test_history_fraction_and_random_tutors(setup):
    gm, history, data, info, _, res, _ = setup
    all_hist = mine_oracles(gm, res.cut_node, info.output_node, history, data.x_val, data.y_val,
                            fraction=1.0)
    assert len(all_hist.window) == len(history)
    rand = mine_oracles(gm, res.cut_node, info.output_node, history, data.x_val, data.y_val,
                        mode="random", seed=3)
    assert len(rand.y) == len(data.x_val)  # DARE-rand: every sample gets a (random) tutor
    assert len(rand.tutor.unique()) > 1


def test_sync_keeps_weights_outside_masks_and_removed_layers_bit_identical(setup):
    gm, _, _, _, _, res, mined = setup
    tuned, info = tune_dare(gm, res, mined, TuneConfig(epochs=5))
    before, after = gm.state_dict(), tuned.state_dict()
    assert set(before) == set(after)
    changed_inside = 0
    for k in before:
        if k in res.masks:
            outside = ~res.masks[k].any(0)
            assert torch.equal(before[k][outside], after[k][outside]), k
            changed_inside += int((before[k] != after[k]).sum())
        else:  # fc2 (the removed layer) and batch-norm statistics
            assert torch.equal(before[k], after[k]), k
    assert changed_inside > 0
    assert info["loss_last"] < info["loss_first"]
    # the original is never modified
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())


def test_per_step_masks_are_per_class(setup):
    """With three classes' batches interleaved, every batch holds one class and every optimiser
    step moves only the key synapses of that class: Adam's moments from the other classes' steps
    would move more, so this holds only because each step restores the weights outside its
    class's mask."""
    gm, _, _, _, _, res, mined = setup
    three = only_classes(mined, (3, 5, 8))
    seen = []  # (class of the batch, the full model's weights before its step)

    def spy(model):  # DARE-adv's hook is handed the model being tuned, before every step
        def attack(x, y):
            assert (y == y[0]).all(), y.tolist()
            seen.append((int(y[0]), {k: model.state_dict()[k].clone() for k in res.masks}))
            return x
        return attack

    tuned, info = tune_dare(gm, res, three, TuneConfig(epochs=2, batch_size=8), adv_attack=spy)
    assert len(seen) == info["steps"] and {c for c, _ in seen} == {3, 5, 8}
    assert any(a != b for (a, _), (b, _) in zip(seen, seen[1:]))  # the classes alternate
    after = [w for _, w in seen[1:]] + [{k: tuned.state_dict()[k] for k in res.masks}]
    moved = 0
    for (c, before), now in zip(seen, after):
        for k, m in res.masks.items():
            changed = before[k] != now[k]
            assert not (changed & ~m[c]).any(), (c, k)
            moved += int(changed.sum())
    assert moved > 0


def test_dare_keeps_clean_accuracy_pinned(setup):
    gm, _, data, _, _, res, mined = setup
    tuned, _ = tune_dare(gm, res, mined, TuneConfig(epochs=30), seed=0)
    before, after = _acc(gm, data), _acc(tuned, data)
    assert before == pytest.approx(0.95, abs=0.04)
    assert after >= before - 0.03


def _changed(a, b) -> dict[str, int]:
    sa, sb = a.state_dict(), b.state_dict()
    return {k: int((sa[k] != sb[k]).sum()) for k in sa}


def test_dare_s_and_dare_sl_tune_more_weights(setup):
    """DARE-s frees every weight of M_T (no slicing), DARE-sl every weight of M: on the same mined
    set each moves strictly more weights than the one before it, and only DARE-sl the last layer."""
    gm, _, _, info, prof, res, mined = setup
    cfg = TuneConfig(epochs=2)
    dare, _ = tune_dare(gm, res, mined, cfg)
    full = full_slice(info, prof, 1)
    assert sum(int(m.sum()) for m in full.masks.values()) > sum(int(m.sum()) for m in res.masks.values())
    dare_s, _ = tune_dare(gm, full, mined, cfg)
    dare_sl, _ = tune_full_model(gm, mined, cfg)
    n_dare, n_s, n_sl = (_changed(gm, m) for m in (dare, dare_s, dare_sl))
    # Without decay how many weights move is set by which ones get a gradient, and DARE and
    # DARE-s differ there by float noise (one fc1 weight either way); what each frees is
    # compared under weight decay below. Only DARE-sl may touch the last layer.
    assert sum(n_dare.values()) > 0 and sum(n_s.values()) > 0
    assert n_dare["fc2.weight"] == n_s["fc2.weight"] == 0 < n_sl["fc2.weight"]
    # Most weights that DARE-s frees get no gradient here (dead units); weight decay moves every
    # weight the optimiser is allowed to touch, which shows DARE-s frees all of M_T. DARE frees
    # 95 % per class (a different 5 % frozen for each), so it moves only weights some class may
    # move, and each class's step may move strictly fewer than DARE-s's.
    decay = TuneConfig(epochs=1, weight_decay=0.01)
    n_s_wd = _changed(gm, tune_dare(gm, full, mined, decay)[0])
    n_wd = _changed(gm, tune_dare(gm, res, mined, decay)[0])
    numel = {k: v.numel() for k, v in gm.state_dict().items()}
    assert all(n_s_wd[k] == numel[k] for k in full.masks)
    # DARE-sl frees every weight of M: with decay it moves all of them, strictly more than DARE-s
    # (without decay the two moved counts differ by a handful and their order is float noise)
    n_sl_wd = _changed(gm, tune_full_model(gm, mined, decay)[0])
    params = [k for k, _ in gm.named_parameters()]
    assert all(n_sl_wd[k] == numel[k] for k in params)
    assert sum(n_s_wd[k] for k in params) < sum(n_sl_wd[k] for k in params)
    assert all(n_wd[k] <= int(res.masks[k].any(0).sum()) for k in res.masks)
    per_class = [sum(int(res.masks[k][c].sum()) for k in res.masks) for c in range(10)]
    assert max(per_class) < sum(numel[k] for k in res.masks)


def test_cancel_is_honoured_between_batches(setup):
    gm, _, _, _, _, res, mined = setup
    calls = iter(range(1000))
    with pytest.raises(Cancelled):
        tune_dare(gm, res, mined, TuneConfig(epochs=5), cancelled=lambda: next(calls) >= 3)


# --- the summary each variant reports, and what a class's batches may touch ----------------

def _key_loss_per_sample(gm, res, mined) -> torch.Tensor:
    """Formula 3 per sample, computed here: the squared error over its class's key neurons."""
    with torch.no_grad():
        diff = build_mt(gm, res.cut_node)(mined.x) - mined.target
    keys = res.key_units[mined.y]
    return (diff.pow(2) * keys).sum(1) / keys.sum(1)


def test_dare_reports_the_mean_key_neuron_loss_of_its_first_epoch(setup):
    """With a vanishing learning rate the first epoch's loss is formula 3's mean over the mined
    samples (batches of unequal size weighted by their size), for many samples and for one."""
    gm, _, _, _, _, res, mined = setup
    two = only_classes(mined, (3, 5))
    assert (res.key_units[[3, 5]].sum(1) > 0).all()
    slow = TuneConfig(epochs=1, lr=1e-12, batch_size=7)
    _, info = tune_dare(gm, res, two, slow)
    want = _key_loss_per_sample(gm, res, two)
    assert info["loss_first"] == pytest.approx(float(want.mean()), rel=1e-4)
    assert info["steps"] == sum(-(-int((two.y == c).sum()) // 7) for c in (3, 5))
    one = only_classes(two, (3,))
    one = type(one)(**{**one.to_state(), **{k: getattr(one, k)[:1] for k in
                                            ("x", "y", "target", "tutor", "tutor_logits")}})
    _, info = tune_dare(gm, res, one, slow)
    assert info["loss_first"] == pytest.approx(float(want[two.y == 3][0]), rel=1e-4)
    # DARE-adv adds the same loss on the attack's examples: an attack that changes nothing
    # doubles it
    _, info = tune_dare(gm, res, two, slow, adv_attack=lambda model: lambda x, y: x)
    assert info["loss_first"] == pytest.approx(2 * float(want.mean()), rel=1e-4)


def test_first_and_last_loss_are_the_first_and_last_epochs(setup):
    """Two epochs of learning: the last epoch's loss is its own, below the first's; a longer run
    starts with the same first epoch (the same seed draws the same batches)."""
    gm, _, _, _, _, res, mined = setup
    two = only_classes(mined, (3, 5))
    for tune in (lambda cfg: tune_dare(gm, res, two, cfg), lambda cfg: tune_full_model(gm, two, cfg)):
        t0 = time.perf_counter()
        _, i2 = tune(TuneConfig(epochs=2, batch_size=8))
        wall = time.perf_counter() - t0
        _, i1 = tune(TuneConfig(epochs=1, batch_size=8))
        assert i2["loss_last"] < i2["loss_first"] == i1["loss_first"] == i1["loss_last"]
        assert i2["epochs"] == 2 and 0 <= i2["seconds"] <= wall


def test_the_tuned_model_is_trainable_and_an_empty_set_says_so(setup):
    gm, _, _, _, _, res, mined = setup
    tuned, _ = tune_dare(gm, res, only_classes(mined, (3,)), TuneConfig(epochs=1))
    assert all(p.requires_grad for p in tuned.parameters())
    _, info = tune_dare(gm, res, only_classes(mined, ()), TuneConfig(epochs=3))
    assert info["epochs"] == info["steps"] == 0 and info["seconds"] == 0.0
    assert info["loss_first"] is None and info["loss_last"] is None and "no mined samples" in info["note"]


def test_a_class_that_frees_no_weight_has_no_say_in_the_tuning(setup):
    """Class 5's batches may move none of the weights here: whatever its samples' targets, the
    tuned model is the same. Restoring the weights after its steps is not enough for that: its
    gradients must not reach the optimiser's moments either, or they steer class 3's steps."""
    gm, _, _, _, _, res, mined = setup
    two = only_classes(mined, (3, 5))
    frozen5 = copy.copy(res)
    frozen5.masks = {k: m.clone() for k, m in res.masks.items()}
    for m in frozen5.masks.values():
        m[5] = False
    other = type(two)(**{**two.to_state(),
                         "target": torch.where((two.y == 5)[:, None], two.target + 1.0, two.target)})
    cfg = TuneConfig(epochs=2, batch_size=8)
    a, _ = tune_dare(gm, frozen5, two, cfg)
    b, _ = tune_dare(gm, frozen5, other, cfg)
    moved = 0
    for k in res.masks:
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k
        moved += int((a.state_dict()[k] != gm.state_dict()[k]).sum())
    assert moved > 0
    # the same change to a class that may move weights does change the result
    c, _ = tune_dare(gm, res, other, cfg)
    d, _ = tune_dare(gm, res, two, cfg)
    assert not torch.equal(c.state_dict()["fc1.weight"], d.state_dict()["fc1.weight"])
