"""Oracle mining (Algorithm 1) on models whose confidences are set by hand, and on the tiny CNN."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from worker.engine.graph import analyze
from worker.engine.mining import mine_oracles

from .tiny import trained


def _fixed(gm, probs: dict[int, float], k: int = 10):
    """A copy of ``gm`` whose softmax is ``probs`` (the rest shared evenly) whatever the input."""
    rest = (1 - sum(probs.values())) / (k - len(probs))
    m = copy.deepcopy(gm)
    with torch.no_grad():
        m.get_parameter("fc2.weight").zero_()
        m.get_parameter("fc2.bias").copy_(torch.tensor([probs.get(i, rest) for i in range(k)]).log())
    return m


def _ck(name, model):
    return SimpleNamespace(name=name, state=model.state_dict())


@pytest.fixture(scope="module")
def subject():
    gm, history, data = trained()
    info = analyze(gm)
    return gm, history, data, info, info.cut(1)[1]


def test_the_most_confident_checkpoint_is_the_tutor_and_a_tie_is_not_better(subject):
    """Class 0: the final model is wrong (confidence 0); three checkpoints are right with 0.50,
    0.60 and then 0.55: the 0.60 one is the tutor, the later, less confident one does not replace
    it. Class 1: a checkpoint exactly as confident as the final model is not a tutor."""
    gm, _, data, info, cut = subject
    final = _fixed(gm, {0: 0.40, 1: 0.45})
    history = [_ck("a", _fixed(gm, {0: 0.50})), _ck("b", _fixed(gm, {0: 0.60})),
               _ck("c", _fixed(gm, {0: 0.55})), _ck("tie", copy.deepcopy(final))]
    x, y = data.x_val[:12], torch.tensor([0, 1] * 6)
    seen = []
    mined = mine_oracles(final, cut, info.output_node, history, x, y, fraction=1.0,
                         progress=seen.append)
    assert mined.y.tolist() == [0] * 6 and mined.tutor.tolist() == [1] * 6
    assert mined.candidates == 12 and mined.window == ["a", "b", "c", "tie"]
    assert torch.allclose(torch.softmax(mined.tutor_logits, 1)[:, 0], torch.full((6,), 0.60))
    # one half of the progress per pass: a quarter of it per checkpoint, then the tutors' pass
    assert seen[:4] == [0.125, 0.25, 0.375, 0.5]
    assert seen[4:] == sorted(seen[4:]) and seen[-1] == 1.0 and all(0.5 < s <= 1 for s in seen[4:])


def test_a_single_mined_sample_ends_the_progress_at_one(subject):
    gm, _, data, info, cut = subject
    final = _fixed(gm, {0: 0.40, 1: 0.45})
    seen = []
    mined = mine_oracles(final, cut, info.output_node, [_ck("a", _fixed(gm, {0: 0.5}))],
                         data.x_val[:2], torch.tensor([0, 1]), progress=seen.append)
    assert mined.y.tolist() == [0] and seen == [0.5, 1.0]


def test_nothing_to_mine_gives_empty_tensors(subject):
    gm, _, data, info, cut = subject
    final = _fixed(gm, {0: 0.40, 1: 0.45})
    mined = mine_oracles(final, cut, info.output_node, [_ck("same", copy.deepcopy(final))],
                         data.x_val[:4], torch.tensor([0, 1, 0, 1]))
    assert mined.candidates == 4
    for t in (mined.x, mined.y, mined.target, mined.tutor_logits, mined.tutor):
        assert t.shape[0] == 0
    # the same trailing shapes as a non-empty mine, so that code taking a softmax over the
    # classes or stacking targets works on it unchanged
    assert mined.tutor_logits.shape == (0, 10)
    full = mine_oracles(final, cut, info.output_node, [_ck("a", _fixed(gm, {0: 0.5}))],
                        data.x_val[:2], torch.tensor([0, 1]))
    assert mined.target.shape[1:] == full.target.shape[1:] and full.target.shape[0] == 1


def test_every_tuning_on_an_empty_mined_set_leaves_the_model_unchanged(subject):
    """DARE, DARE-sl and the plain fine-tune all take the mined set; none fails on an empty one
    (a subject whose history never beats the final model), and none changes a weight."""
    from worker.engine.baselines import finetune_mined
    from worker.engine.config import TuneConfig
    from worker.engine.profiling import profile
    from worker.engine.slicing import slice_model
    from worker.engine.tuning import tune_dare, tune_full_model

    gm, _, data, info, cut = subject
    final = _fixed(gm, {0: 0.40, 1: 0.45})
    mined = mine_oracles(final, cut, info.output_node, [_ck("same", copy.deepcopy(final))],
                         data.x_val[:4], torch.tensor([0, 1, 0, 1]))
    cfg = TuneConfig(epochs=2)
    before = {k: v.clone() for k, v in final.state_dict().items()}
    fi = analyze(final)
    sliced = slice_model(fi, profile(fi, data.x_train[:40], data.y_train[:40], 10), 0.95, 1)
    for tuned, _ in (tune_dare(final, sliced, mined, cfg), tune_full_model(final, mined, cfg),
                     finetune_mined(final, mined.x, mined.y, cfg)):
        after = tuned.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_window_is_the_latest_fraction_and_at_least_the_final_checkpoint(subject):
    gm, history, data, info, cut = subject
    x, y = data.x_val[:20], data.y_val[:20]
    names = [h.name for h in history]
    assert len(names) == 8
    for fraction, want in ((0.0, names[-1:]), (0.01, names[-1:]), (0.3, names[-3:]), (1.0, names)):
        got = mine_oracles(gm, cut, info.output_node, history, x, y, fraction=fraction).window
        assert got == want, fraction


def test_mining_does_not_depend_on_the_batch_size(subject):
    gm, history, data, info, cut = subject
    whole = mine_oracles(gm, cut, info.output_node, history, data.x_val, data.y_val)
    small = mine_oracles(gm, cut, info.output_node, history, data.x_val, data.y_val, batch_size=7)
    assert len(whole.y) > 7
    assert torch.equal(whole.tutor, small.tutor) and torch.equal(whole.y, small.y)
    assert torch.allclose(whole.target, small.target, atol=1e-5)
    assert torch.allclose(whole.tutor_logits, small.tutor_logits, atol=1e-5)


def test_random_tutors_are_seeded_and_cover_the_window(subject):
    gm, history, data, info, cut = subject

    def rand(seed):
        return mine_oracles(gm, cut, info.output_node, history, data.x_val, data.y_val,
                            mode="random", seed=seed)

    a = rand(3)
    assert sorted(a.tutor.unique().tolist()) == list(range(len(a.window)))
    assert torch.equal(a.tutor, rand(3).tutor) and not torch.equal(a.tutor, rand(4).tutor)
    with pytest.raises(ValueError, match="mode"):
        mine_oracles(gm, cut, info.output_node, history, data.x_val, data.y_val, mode="oracle")


def test_a_checkpoint_may_lack_tensors_but_not_bring_unknown_ones(subject):
    """A checkpoint without a buffer inference does not use loads (the model keeps its own);
    one with a tensor the model lacks is refused, naming it."""
    gm, history, data, info, cut = subject
    x, y = data.x_val[:50], data.y_val[:50]
    full = mine_oracles(gm, cut, info.output_node, history, x, y)
    lean = [SimpleNamespace(name=h.name, state={k: v for k, v in h.state.items()
                                                if k != "bn.num_batches_tracked"}) for h in history]
    assert torch.equal(mine_oracles(gm, cut, info.output_node, lean, x, y).tutor, full.tutor)
    extra = [SimpleNamespace(name=h.name, state={**h.state, "fc3.weight": torch.zeros(1)})
             for h in history]
    with pytest.raises(ValueError, match="fc3.weight"):
        mine_oracles(gm, cut, info.output_node, extra, x, y)
