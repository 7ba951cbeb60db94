import pytest
import torch

from worker.engine.config import TuneConfig
from worker.engine.errors import Cancelled
from worker.engine.graph import analyze
from worker.engine.mining import mine_oracles
from worker.engine.profiling import profile
from worker.engine.slicing import full_slice, slice_model
from worker.engine.tuning import tune_dare, tune_full_model

from .tiny import trained


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
    """A single class's batches move only that class's key synapses."""
    gm, _, _, _, _, res, mined = setup
    only = (mined.y == 3)
    one = type(mined)(**{**mined.to_state(), "x": mined.x[only], "y": mined.y[only],
                         "target": mined.target[only], "tutor": mined.tutor[only],
                         "tutor_logits": mined.tutor_logits[only]})
    tuned, _ = tune_dare(gm, res, one, TuneConfig(epochs=3))
    for k, m in res.masks.items():
        outside = ~m[3]
        assert torch.equal(gm.state_dict()[k][outside], tuned.state_dict()[k][outside]), k


def test_dare_keeps_clean_accuracy_pinned(setup):
    gm, _, data, _, _, res, mined = setup
    tuned, _ = tune_dare(gm, res, mined, TuneConfig(epochs=30), seed=0)
    before, after = _acc(gm, data), _acc(tuned, data)
    assert before == pytest.approx(0.95, abs=0.04)
    assert after >= before - 0.03


def test_dare_s_and_dare_sl_tune_more_weights(setup):
    gm, _, _, info, prof, _, mined = setup
    tuned_s, _ = tune_dare(gm, full_slice(info, prof, 1), mined, TuneConfig(epochs=2))
    assert not torch.equal(gm.state_dict()["fc1.weight"], tuned_s.state_dict()["fc1.weight"])
    assert torch.equal(gm.state_dict()["fc2.weight"], tuned_s.state_dict()["fc2.weight"])
    tuned_sl, _ = tune_full_model(gm, mined, TuneConfig(epochs=2))
    assert not torch.equal(gm.state_dict()["fc2.weight"], tuned_sl.state_dict()["fc2.weight"])


def test_cancel_is_honoured_between_batches(setup):
    gm, _, _, _, _, res, mined = setup
    calls = iter(range(1000))
    with pytest.raises(Cancelled):
        tune_dare(gm, res, mined, TuneConfig(epochs=5), cancelled=lambda: next(calls) >= 3)
