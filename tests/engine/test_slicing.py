import math

import pytest
import torch

from worker.engine.graph import analyze
from worker.engine.profiling import profile
from worker.engine.slicing import full_slice, slice_model, top_fraction

from .tiny import trained


@pytest.fixture(scope="module")
def sliced():
    gm, _, data = trained()
    info = analyze(gm)
    prof = profile(info, data.x_train, data.y_train, 10)
    return info, prof, slice_model(info, prof, 0.95, 1)


def test_profile_overall_mean_is_the_count_weighted_class_mean(sliced):
    info, prof, _ = sliced
    _, _, data = trained()
    counts = torch.bincount(data.y_train, minlength=10).float()
    for layer in info.layers:
        m = prof.out[layer.node]
        assert torch.allclose((m[:10] * counts[:, None]).sum(0) / counts.sum(), m[10], atol=1e-5)


def test_masks_cover_every_parameter_of_mt_and_nothing_removed(sliced):
    info, _, res = sliced
    assert set(res.masks) == {"c1.weight", "c1.bias", "bn.weight", "bn.bias", "c2.weight", "c2.bias",
                              "fc1.weight", "fc1.bias"}
    state = info.gm.state_dict()
    for k, m in res.masks.items():
        assert m.shape == (10, *state[k].shape) and m.dtype == torch.bool
    # a conv synapse is a whole (out, in) kernel slice
    w = res.masks["c2.weight"]
    assert torch.equal(w, w[..., :1, :1].expand_as(w))


def test_fc1_masks_match_a_direct_evaluation_of_formula_2(sliced):
    """Loop-free code against a per-synapse loop on the last two layers."""
    info, prof, res = sliced
    state = info.gm.state_dict()
    fc1, fc2 = info.layers[2].node, info.layers[3].node
    w1, w2 = state["fc1.weight"], state["fc2.weight"]
    for c in (0, 7):
        # last layer: CONTRIB of output neuron c is 1
        contrib2 = torch.zeros_like(w2)
        for h in range(w2.shape[1]):
            contrib2[c, h] = 1 * prof.delta_out(fc2, c)[c] * w2[c, h] * prof.delta_in(fc2, c)[h]
        c_fc1 = torch.sign(contrib2).sum(0)
        expect = torch.zeros_like(w1)
        for n in range(w1.shape[0]):
            for h in range(w1.shape[1]):
                expect[n, h] = c_fc1[n] * prof.delta_out(fc1, c)[n] * w1[n, h] * prof.delta_in(fc1, c)[h]
        assert torch.equal(res.masks["fc1.weight"][c], top_fraction(expect, 0.95))
        assert torch.equal(res.key_units[c], top_fraction(contrib2, 0.95).any(0) | res.masks["fc1.bias"][c])


def test_top_fraction_freezes_exactly_the_bottom_of_all_synapses():
    torch.manual_seed(0)
    v = torch.randn(50, 40)
    v[v.abs() < 0.5] = 0  # many exact ties at zero, as in the last layers
    n = v.numel()
    for q in (0.5, 0.9, 0.95, 1.0):
        m = top_fraction(v, q)
        assert int((~m).sum()) == round((1 - q) * n)  # over all synapses, zero ones included
        if (~m).any():
            assert v[~m].max() <= v[m].min()  # the smallest ones are frozen
    # ties are broken by position: of equal values the lowest flat indices are frozen first
    flat = torch.zeros(10)
    assert top_fraction(flat, 0.7).tolist() == [False] * 3 + [True] * 7
    assert torch.equal(top_fraction(v, 0.95), top_fraction(v.clone(), 0.95))


def test_frozen_share_is_one_minus_q_per_class_and_layer(sliced):
    info, prof, res = sliced
    share = res.stats["frozen_share"]
    state = info.gm.state_dict()
    weight_of = {L.node: L.weight_key for L in info.layers}
    assert set(share["per_layer"]) == set(res.stats["layers_in_mt"])
    for node, frozen in share["per_layer"].items():
        # conv synapses are (out, in) pairs whose kernels move together, so the weight share is
        # the synapse share: exactly round(5 %) of the layer's synapses, for every class
        w = state[weight_of[node]]
        n = w.shape[0] * w.shape[1]
        assert frozen == pytest.approx(round(0.05 * n) / n, abs=1e-6), node
        per_class = (~res.masks[weight_of[node]]).flatten(1).sum(1) // (w[0, 0].numel())
        assert per_class.tolist() == [round(0.05 * n)] * 10
    assert 0.03 < share["overall"] <= 0.05
    assert share["by_every_class"] <= share["overall"]


def test_smaller_q_keeps_fewer_synapses(sliced):
    info, prof, res = sliced
    fewer = slice_model(info, prof, 0.75, 1)
    assert fewer.stats["key_synapse_fraction"] < res.stats["key_synapse_fraction"]
    for k in res.masks:
        assert not (fewer.masks[k] & ~res.masks[k]).any(), k  # nested


def test_every_class_has_key_neurons_and_different_slices(sliced):
    _, _, res = sliced
    assert (res.key_units.sum(1) > 0).all()
    assert not torch.equal(res.masks["fc1.weight"][0], res.masks["fc1.weight"][1])


def test_dare_s_frees_everything(sliced):
    info, prof, _ = sliced
    res = full_slice(info, prof, 1)
    assert all(m.all() for m in res.masks.values()) and res.key_units.all()


def test_frozen_count_rounds_half_up_and_never_freezes_everything():
    from worker.engine.slicing import frozen_count

    assert frozen_count(5, 0.9) == 1  # (1 - 0.9) * 5 is 0.4999... in floating point
    assert frozen_count(10, 0.95) == 1 and frozen_count(30, 0.95) == 2
    assert frozen_count(10, 0.1) == 9 and frozen_count(10, 0.0) == 9  # one synapse always stays
    assert frozen_count(10, 1.0) == 0 and frozen_count(0, 0.5) == 0
    assert int((~top_fraction(torch.arange(10.0), 0.0)).sum()) == 9


def test_ties_are_broken_by_position_among_many():
    """Thousands of equal contributions (dead units): the lowest flat indices are frozen."""
    v = torch.zeros(5000)
    v[::7] = 1.0
    keep = top_fraction(v, 0.5)
    zeros = torch.nonzero(v == 0).squeeze(1)
    assert torch.equal(torch.nonzero(~keep).squeeze(1), zeros[:2500])


def test_key_synapse_fraction_counts_the_kept_synapses_of_mt(sliced):
    info, _, res = sliced
    kept = total = 0
    for L in info.layers[:res.k]:
        m = res.masks[L.weight_key]
        syn = m.flatten(3)[..., 0] if m.dim() > 3 else m  # a conv synapse is a whole kernel
        kept += int(syn.sum())
        total += syn.numel()
    assert res.stats["key_synapse_fraction"] == kept / total
    assert res.stats["key_units_per_class"] == res.key_units.sum(1).tolist()
    assert res.stats["cut_units"] == res.key_units.shape[1] == 32
    assert res.stats["q"] == 0.95 and res.stats["layers_in_mt"] == [L.node for L in info.layers[:res.k]]
    assert 0 < res.stats["nonzero_synapse_fraction"] < 1


def test_a_norm_channel_is_tuned_with_the_conv_channel_it_normalises(sliced):
    """c1 -> bn: bn's channel c is free for a class exactly when c1's output channel c is a key
    neuron of that class (c1's bias mask says which). At q = 0.5 half of c1's channels are not."""
    info, prof, _ = sliced
    res = slice_model(info, prof, 0.5, 1)
    assert torch.equal(res.masks["bn.weight"], res.masks["c1.bias"])
    assert torch.equal(res.masks["bn.bias"], res.masks["c1.bias"])
    assert res.masks["bn.weight"].any() and not res.masks["bn.weight"].all()


def test_dare_s_stats_say_nothing_is_frozen(sliced):
    info, prof, _ = sliced
    res = full_slice(info, prof, 1)
    s = res.stats
    assert s["q"] == 1.0 and s["key_synapse_fraction"] == 1.0 and s["variant"] == "no slicing"
    assert s["frozen_share"]["overall"] == 0.0 and s["frozen_share"]["by_every_class"] == 0.0
    assert s["key_units_per_class"] == [s["cut_units"]] * 10


def test_a_flattened_conv_channel_hands_all_its_positions_to_the_cut(sliced):
    """Two layers removed: M_T ends at the flattened conv features (8 channels x 16 positions)
    that fc1 reads. A channel that is a key neuron of c2 makes all 16 of its features key units."""
    info, prof, _ = sliced
    res = slice_model(info, prof, 0.95, 2)
    assert res.stats["cut_units"] == 128 and "fc1.weight" not in res.masks
    per_channel = res.key_units.view(10, 8, 16)
    key_c2 = res.masks["c2.bias"]  # c2's key output channels, per class
    assert key_c2.any()
    assert per_channel[key_c2].all()


def test_with_a_silent_last_layer_no_synapse_contributes(sliced):
    """fc2's weights zeroed: the output no longer depends on the input, every class delta there is
    0, so formula 2 gives 0 to every synapse of M_T; on the trained model most are not 0."""
    import copy

    info, prof, res = sliced
    assert res.stats["nonzero_synapse_fraction"] > 0.5
    gm = copy.deepcopy(info.gm)
    with torch.no_grad():
        gm.get_parameter("fc2.weight").zero_()
    _, _, data = trained()
    silent = analyze(gm)
    out = slice_model(silent, profile(silent, data.x_train, data.y_train, 10), 0.95, 1)
    assert out.stats["nonzero_synapse_fraction"] == 0.0


def test_key_units_are_touched_by_key_synapses_on_either_side_of_the_cut(sliced):
    """At q = 0.05 few synapses stay key: fc1's key output neurons (its bias mask) and fc2's key
    input neurons are both key units at the cut, and neither side alone covers them."""
    info, prof, _ = sliced
    res = slice_model(info, prof, 0.05, 1)
    fc1_side = res.masks["fc1.bias"]
    assert (res.key_units >= fc1_side).all()
    assert (res.key_units & ~fc1_side).any() and not res.key_units.all()
