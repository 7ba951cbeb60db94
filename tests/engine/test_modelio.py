"""Loading models (.pt2 and .onnx) and their per-epoch history zips."""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file

from worker.engine.data import load_embedded
from worker.engine.errors import InputError
from worker.engine.export import export_pt2
from worker.engine.history import epoch_of, load_history
from worker.engine.modelio import load_model
from worker.engine.reference import ARCHS, train_reference


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """Every reference architecture trained 2 epochs on digits, in both formats."""
    root = tmp_path_factory.mktemp("subjects")
    splits = load_embedded("digits")
    return {a: train_reference(a, splits, 2, root / a) for a in ARCHS}, splits


def _err(fn, *args) -> InputError:
    with pytest.raises(InputError) as ei:
        fn(*args)
    return ei.value


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ARCHS)
def test_both_formats_load_to_the_same_function(subjects, arch):
    subs, splits = subjects
    r = subs[arch]
    last = load_file(str(r["checkpoints"][-1]))
    x = splits.x_test[:32]
    outs = []
    for key, fmt in (("model_pt2", "pt2"), ("model_onnx", "onnx")):
        lm = load_model(r[key])
        assert lm.fmt == fmt and lm.input_shape == (1, 8, 8) and lm.num_outputs == 10
        assert not lm.gm.training
        params = list(lm.gm.parameters())
        assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
        # canonical names are the state-dict names for both formats (the ONNX export keeps them;
        # BatchNorm's num_batches_tracked has no ONNX counterpart)
        want = {k for k in last if fmt == "pt2" or not k.endswith("num_batches_tracked")}
        assert set(lm.name_map) == want
        canon = lm.canonical_state(lm.gm.state_dict())
        for k in want:
            assert torch.equal(canon[k], last[k]), k
        # gm_state inverts canonical_state
        gs = lm.gm_state(canon)
        sd = lm.gm.state_dict()
        assert all(torch.equal(gs[k], sd[k]) for k in gs)
        with torch.no_grad():
            outs.append(lm.gm(x))
    assert outs[0].shape == (32, 10)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    acc = float((outs[0].argmax(1) == splits.y_test[:32]).float().mean())
    assert acc == pytest.approx(
        float((outs[1].argmax(1) == splits.y_test[:32]).float().mean()))


def test_pt2_graph_module_can_be_fine_tuned(subjects):
    subs, splits = subjects
    lm = load_model(subs["vgg"]["model_pt2"])
    lm.gm.train()
    lm.gm.eval()  # torch.export's module() makes these raise; the loader restores them
    before = {k: v.clone() for k, v in lm.gm.state_dict().items()}
    opt = torch.optim.SGD(lm.gm.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(lm.gm(splits.x_train[:16]), splits.y_train[:16])
    loss.backward()
    opt.step()
    after = lm.gm.state_dict()
    assert not torch.equal(before["classifier.5.weight"], after["classifier.5.weight"])
    # the exported graph computes BatchNorm with running statistics: they never move
    assert torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])


def test_unknown_extension_and_corrupt_files(tmp_path):
    p = tmp_path / "model.h5"
    p.write_bytes(b"x")
    assert _err(load_model, p).code == "unsupported_model_format"
    for name in ("model.onnx", "model.pt2"):
        p = tmp_path / name
        p.write_bytes(os.urandom(256))
        e = _err(load_model, p)
        assert e.code == "corrupt_model" and name in e.message


class _Evil:
    """Unpickling this runs a shell command (that touches a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poisoned_pt2(src, dst, marker):
    """``src`` with its sample inputs replaced by a pickle that runs code: torch.export.load
    in torch 2.14 retries a failed weights_only load of that member with weights_only=False."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if "/data/sample_inputs/" in info.filename:
                data = _pt_bytes(_Evil(marker))
            zout.writestr(info, data)
    return dst


def test_pt2_that_would_run_code_is_refused_and_not_run(subjects, tmp_path):
    marker = tmp_path / "pwned"
    bad = _poisoned_pt2(subjects[0]["mlp"]["model_pt2"], tmp_path / "evil.pt2", marker)
    e = _err(load_model, bad)
    assert e.code == "unsafe_model" and "evil.pt2" in e.message and "sample_inputs" in e.message
    assert not marker.exists()
    # the same archive as a history member
    lm = load_model(subjects[0]["mlp"]["model_pt2"])
    z = _zip(tmp_path / "h.zip", {"epoch_1.pt2": bad.read_bytes()})
    e = _err(load_history, z, lm)
    assert e.code == "unsafe_checkpoint" and "epoch_1.pt2" in e.message
    assert not marker.exists()


# The hostile .pt2 corpus (tests/service/hostile_pt2.py): each variant is a real
# torch.export.save archive edited to run a payload that creates a marker file.


@pytest.fixture(scope="module")
def hostile_pt2():
    from tests.service import hostile_pt2

    return hostile_pt2


def test_weights_only_is_forced_even_where_a_caller_asks_for_pickles(hostile_pt2, tmp_path):
    """Importing worker.engine set TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 (this test process did, via
    worker.engine.modelio): torch.load(weights_only=False) of a payload refuses it unrun."""
    marker = tmp_path / "pwned"
    evil = hostile_pt2.torch_pickle(_Evil(marker))
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    with pytest.raises(Exception, match="posix.system|Unsupported global"):
        torch.load(io.BytesIO(evil), weights_only=False)
    assert not marker.exists()


def test_hostile_pt2_payloads_run_unprotected_and_weights_only_stops_the_pickles(hostile_pt2,
                                                                               tmp_path):
    """Plain torch.export.load in a fresh interpreter runs every payload marked live (so a
    missing marker elsewhere means something). The same loads after ``import worker.engine``,
    with the archive check bypassed, run none of the pickles read through torch.load; the two
    that torch reads otherwise (pickle.loads of an opaque constant, sympify of an expression)
    are what pt2_layout refuses before torch sees the archive."""
    plain_dir, prot_dir = tmp_path / "plain", tmp_path / "protected"
    results = {}
    for d, protect in ((plain_dir, False), (prot_dir, True)):
        archives = hostile_pt2.write_all(d, d.name)
        markers = {n: hostile_pt2.marker_for(d, n, d.name) for n in archives}
        results[protect] = hostile_pt2.probe(archives, markers, protect=protect)
    assert results[False]["env"] is None and results[True]["env"] == "1"
    for name, v in hostile_pt2.VARIANTS.items():
        assert results[False]["ran"][name] == v.live, name
        assert results[True]["ran"][name] == (v.live and not v.via_torch_load), name
    assert sum(v.live for v in hostile_pt2.VARIANTS.values()) >= 8


def test_engine_refuses_every_hostile_pt2_as_model_and_as_checkpoint(hostile_pt2, tmp_path):
    good = tmp_path / "good.pt2"
    good.write_bytes(hostile_pt2.mlp_pt2(0))
    lm = load_model(good)
    assert lm.fmt == "pt2" and lm.input_shape == (1, 8, 8) and lm.num_outputs == 10
    ok = load_history(_zip(tmp_path / "ok.zip", {"epoch_1.pt2": hostile_pt2.mlp_pt2(1)}), lm)
    assert len(ok) == 1 and set(ok[0].state) == set(lm.name_map.values())
    ran = []
    for name, v in hostile_pt2.VARIANTS.items():
        marker = hostile_pt2.marker_for(tmp_path, name, "engine")
        bad = tmp_path / f"{name.replace(' ', '-')}.pt2"
        bad.write_bytes(v.build(marker))
        e = _err(load_model, bad)
        assert e.code == "unsafe_model" and bad.name in e.message, (name, e.message)
        assert all(w in e.message for w in v.words), (name, e.message)
        e = _err(load_history, _zip(tmp_path / "h.zip", {"epoch_1.pt2": bad.read_bytes()}), lm)
        assert e.code == "unsafe_checkpoint" and "epoch_1.pt2" in e.message, (name, e.message)
        assert all(w in e.message for w in v.words), (name, e.message)
        ran += [name] if marker.exists() else []
    assert ran == []


def test_pt2_layout_accepts_what_torch_writes_tied_weights_and_constants(tmp_path):
    """Tied weights share one path_name (the saver deduplicates storage) and a tensor created
    in forward becomes a constant: both are the saver's own layout and are accepted."""
    from worker.engine.modelio import check_pt2_archive

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 10)
            self.b = self.a

        def forward(self, x):
            x = x.flatten(1) + torch.tensor([0.5])
            return self.a(x) + self.b(x)

    ep = torch.export.export(Tied().eval(), (torch.rand(2, 1, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "tied.pt2"))
    with zipfile.ZipFile(tmp_path / "tied.pt2") as z:
        cfg = json.loads(z.read("tied/data/weights/model_weights_config.json"))["config"]
        consts = json.loads(z.read("tied/data/constants/model_constants_config.json"))["config"]
    assert len({m["path_name"] for m in cfg.values()}) < len(cfg) and consts
    check_pt2_archive(tmp_path / "tied.pt2", "model 'tied.pt2'")
    assert load_model(tmp_path / "tied.pt2").num_outputs == 10


@pytest.mark.parametrize("expr,ok", [
    ("Symbol('s31', positive=True, integer=True)", True),
    ("Mul(Integer(2), Symbol('s0', integer=True))", True),
    ("FloorDiv(s0, 2) + 3*s1 - 1 <= 4096", True),
    ("__import__('os').system('id')", False),
    ("open('/tmp/x', 'w')", False),
    ("Symbol('s0').__class__", False),
    ("Symbol(eval('1'))", False),
    ("(lambda: 1)()", False),
    ("Symbol('s0', integer=__import__('os'))", False),
    ("exec", False),
    ("[s0 for s0 in ()]", False),
])
def test_sym_expressions_are_an_allow_list(expr, ok):
    from worker.engine.pt2_layout import sym_expr_problem

    assert (sym_expr_problem(expr) is None) == ok, sym_expr_problem(expr)


def test_pt2_layout_refuses_edits_torch_never_makes(hostile_pt2, tmp_path):
    """Small edits of a real archive, each refused with a message naming the member."""
    from worker.engine.modelio import check_pt2_archive

    root, rel = hostile_pt2._parts(hostile_pt2.mlp_pt2(0))
    program = json.loads(rel["models/model.json"])

    def refused(members: dict, extra=()) -> str:
        p = tmp_path / "edit.pt2"
        p.write_bytes(hostile_pt2._rebuild(members, root, list(extra)))
        return _err(check_pt2_archive, p, "model 'edit.pt2'").message

    def with_program(**changes) -> dict:
        return {**rel, "models/model.json": json.dumps({**program, **changes}).encode()}

    nodes = program["graph_module"]["graph"]["nodes"]
    evil_nodes = [dict(nodes[0], target="torch.os.system"), *nodes[1:]]
    graph = dict(program["graph_module"]["graph"], nodes=evil_nodes)
    assert "torch.os.system" in refused(with_program(
        graph_module=dict(program["graph_module"], graph=graph)))
    assert "guards code" in refused(with_program(guards_code=["__import__('os')"]))
    calls = program["graph_module"]["module_call_graph"]
    spec = json.dumps([1, {"type": "collections.defaultdict", "context": "{}",
                           "children_spec": []}])
    bad_calls = [dict(calls[0], signature=dict(calls[0]["signature"], in_spec=spec)), *calls[1:]]
    assert "collections.defaultdict" in refused(with_program(
        graph_module=dict(program["graph_module"], module_call_graph=bad_calls)))
    enum = json.dumps([1, {"type": "builtins.dict", "context": json.dumps(
        [{"__enum__": True, "fqn": "os:system", "name": "x"}]), "children_spec": []}])
    bad_calls = [dict(calls[0], signature=dict(calls[0]["signature"], out_spec=enum)), *calls[1:]]
    assert "enum" in refused(with_program(
        graph_module=dict(program["graph_module"], module_call_graph=bad_calls)))
    assert "missing" in refused({k: v for k, v in rel.items() if k != "archive_format"})
    assert "weight_0" in refused({k: v for k, v in rel.items() if k != "data/weights/weight_0"})
    assert "referenced by no config" in refused({**rel, "data/weights/weight_99": b"\0" * 4})
    assert "data/aotinductor/model/x.so" in refused({**rel, "data/aotinductor/model/x.so": b"\x7fELF"})
    assert "outside the archive's root" in refused(rel, [("other/x", b"")])
    assert "twice" in refused(rel, [(f"{root.upper()}/ARCHIVE_FORMAT", b"pt2")])


def test_static_batch_pt2_is_refused(tmp_path):
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    ep = torch.export.export(m, (torch.rand(2, 1, 8, 8),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    e = _err(load_model, tmp_path / "m.pt2")
    assert e.code == "static_batch" and "exactly 2" in e.message and "dynamic_shapes" in e.hint


def test_flat_input_pt2_is_refused(tmp_path):
    export_pt2(nn.Linear(64, 3).eval(), torch.rand(2, 64), tmp_path / "flat.pt2")
    assert _err(load_model, tmp_path / "flat.pt2").code == "unsupported_input_shape"


def _onnx_model(nodes, inits, opset=17, in_shape=("N", 4), out_dim=3, extra_opsets=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _conv_gemm(trans_b: int, opset: int = 17, extra_node=None):
    """Conv(1->2, 3x3) -> Flatten -> Gemm; W stored (in, out) when trans_b == 0."""
    rng = np.random.default_rng(0)
    inits = {
        "conv.w": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "conv.b": rng.standard_normal(2).astype(np.float32),
        "fc.w": rng.standard_normal((3, 8) if trans_b else (8, 3)).astype(np.float32),
        "fc.b": rng.standard_normal(3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=trans_b),
    ]
    if extra_node is not None:
        nodes[1] = extra_node
    return _onnx_model(nodes, inits, opset=opset, in_shape=("N", 1, 4, 4)), inits


def test_onnx_gemm_without_transB_is_mapped_transposed(tmp_path):
    proto, inits = _conv_gemm(trans_b=0)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    lm = load_model(tmp_path / "m.onnx")
    assert lm.input_shape == (1, 4, 4) and lm.num_outputs == 3
    assert lm.transposed == {"fc.w"}
    assert set(lm.name_map) == set(inits)
    canon = lm.canonical_state(lm.gm.state_dict())
    for k, v in inits.items():
        np.testing.assert_array_equal(canon[k].numpy(), v)
    assert lm.canonical_shapes["fc.w"] == (8, 3)
    # the GM holds the nn.Linear layout
    assert lm.gm.state_dict()[lm.name_map["fc.w"]].shape == (3, 8)


def test_onnx_opset_above_17_is_refused(tmp_path):
    proto, _ = _conv_gemm(trans_b=1, opset=18)
    onnx.save(proto, str(tmp_path / "m18.onnx"))
    e = _err(load_model, tmp_path / "m18.onnx")
    assert e.code == "unsupported_opset"
    assert "opset 18" in e.message and "m18.onnx" in e.message
    assert "opset_version=17" in e.hint


def test_unconvertible_onnx_op_is_named(tmp_path):
    node = helper.make_node("Hardmax", ["c"], ["r"], name="hm", axis=1)
    proto, _ = _conv_gemm(trans_b=1, extra_node=node)
    onnx.save(proto, str(tmp_path / "hm.onnx"))
    e = _err(load_model, tmp_path / "hm.onnx")
    assert e.code == "unsupported_op"
    assert "Hardmax" in e.message and "'hm'" in e.message
    assert "opset_version=17" in e.hint


# --------------------------------------------------------------------------- history


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _st_bytes(state) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def _pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_reference_history_loads_in_order(subjects, fmt):
    subs, splits = subjects
    r = subs["resnet"]
    lm = load_model(r[f"model_{fmt}"])
    hist = load_history(r["history_zip"], lm)
    assert [c.epoch for c in hist] == [1, 2]
    assert [c.name for c in hist] == ["epoch_1.safetensors", "epoch_2.safetensors"]
    first = load_file(str(r["checkpoints"][0]))
    for canon, key in lm.name_map.items():
        assert torch.equal(hist[0].state[key], first[canon]), canon
    assert set(hist[0].state) == set(lm.name_map.values())
    # the last checkpoint is the exported model
    ref = lm.gm(splits.x_test[:8]).detach()
    lm.gm.load_state_dict(hist[0].state, strict=False)
    lm.gm.load_state_dict(hist[-1].state, strict=False)
    assert torch.allclose(lm.gm(splits.x_test[:8]), ref, atol=1e-6)


def test_history_orders_by_number_not_by_name(subjects, tmp_path):
    subs, _ = subjects
    r = subs["mlp"]
    lm = load_model(r["model_pt2"])
    states = [load_file(str(p)) for p in r["checkpoints"]]
    z = _zip(tmp_path / "h.zip", {
        "run/epoch_10.safetensors": _st_bytes(states[1]),
        "run/epoch_2.safetensors": _st_bytes(states[0]),
        "run/epoch_1.pt": _pt_bytes(states[0]),
        "__MACOSX/._epoch_1.pt": b"junk",
        "run/": b"",
    })
    hist = load_history(z, lm)
    assert [c.epoch for c in hist] == [1, 2, 10]
    assert torch.equal(hist[2].state["fc3.weight"], states[1]["fc3.weight"])


def test_mixed_member_formats_and_wrapped_pt(subjects, tmp_path):
    subs, _ = subjects
    r = subs["lenet"]
    lm = load_model(r["model_onnx"])
    states = [load_file(str(p)) for p in r["checkpoints"]]
    z = _zip(tmp_path / "h.zip", {
        "ckpt-1.pt": _pt_bytes({"epoch": 1, "state_dict": states[0]}),
        "ckpt-2.pt2": r["model_pt2"].read_bytes(),
        "ckpt-3.onnx": r["model_onnx"].read_bytes(),
    })
    hist = load_history(z, lm)
    assert [c.epoch for c in hist] == [1, 2, 3]
    key = lm.name_map["fc1.weight"]
    assert torch.equal(hist[0].state[key], states[0]["fc1.weight"])
    assert torch.equal(hist[1].state[key], states[1]["fc1.weight"])
    assert torch.equal(hist[2].state[key], states[1]["fc1.weight"])


def test_manifest_decides_the_order(subjects, tmp_path):
    subs, _ = subjects
    r = subs["mlp"]
    lm = load_model(r["model_pt2"])
    states = [load_file(str(p)) for p in r["checkpoints"]]
    z = _zip(tmp_path / "h.zip", {
        "late.safetensors": _st_bytes(states[1]),
        "early.safetensors": _st_bytes(states[0]),
        "manifest.json": json.dumps({"checkpoints": ["early.safetensors", "late.safetensors"]}),
    })
    hist = load_history(z, lm)
    assert [c.name for c in hist] == ["early.safetensors", "late.safetensors"]
    assert [c.epoch for c in hist] == [1, 2]
    # the reference trainer's own manifest is self-describing
    with zipfile.ZipFile(r["history_zip"]) as zf:
        man = json.loads(zf.read("manifest.json"))
    assert man["arch"] == "mlp" and man["in_shape"] == [1, 8, 8] and man["num_classes"] == 10
    assert [c["epoch"] for c in man["checkpoints"]] == [1, 2]


@pytest.mark.parametrize("name, epoch", [
    ("epoch_3.safetensors", 3), ("ckpt-12.pt", 12), ("run1/model_epoch12_acc93.pt", 12),
    ("weights-007.pth", 7), ("resnet18_epoch3.pt2", 3), ("final.onnx", None)])
def test_epoch_numbers_from_names(name, epoch):
    assert epoch_of(name) == epoch


def _bad(state, key, how):
    s = dict(state)
    if how == "shape":
        s[key] = torch.zeros(5, 5)
    elif how == "missing":
        del s[key]
    else:
        s[key] = s[key].clone()
        s[key].view(-1)[3] = float("nan")
    return s


@pytest.mark.parametrize("how, words", [
    ("shape", ["has shape (5, 5) but the model's is (64, 128)"]),
    ("missing", ["is missing"]),
    ("nan", ["NaN"]),
])
def test_mismatched_checkpoint_names_checkpoint_and_tensor(subjects, tmp_path, how, words):
    subs, _ = subjects
    r = subs["mlp"]
    lm = load_model(r["model_pt2"])
    states = [load_file(str(p)) for p in r["checkpoints"]]
    z = _zip(tmp_path / "h.zip", {
        "epoch_1.safetensors": _st_bytes(states[0]),
        "epoch_3.safetensors": _st_bytes(_bad(states[1], "fc2.weight", how)),
    })
    e = _err(load_history, z, lm)
    assert e.code == "history_mismatch"
    assert "checkpoint 'epoch_3.safetensors'" in e.message and "'fc2.weight'" in e.message
    for w in words:
        assert w in e.message, e.message


def test_malicious_pickle_is_refused_and_not_run(subjects, tmp_path):
    marker = tmp_path / "pwned"
    subs, _ = subjects
    lm = load_model(subs["mlp"]["model_pt2"])
    z = _zip(tmp_path / "h.zip", {"epoch_1.pt": _pt_bytes({"fc1.weight": _Evil(marker)})})
    e = _err(load_history, z, lm)
    assert e.code == "unsafe_checkpoint" and "epoch_1.pt" in e.message
    assert not marker.exists()


def test_unsafe_and_broken_archives(subjects, tmp_path):
    subs, _ = subjects
    lm = load_model(subs["mlp"]["model_pt2"])
    st = subs["mlp"]["checkpoints"][0].read_bytes()
    assert _err(load_history, _zip(tmp_path / "a.zip", {"../epoch_1.safetensors": st}),
                lm).code == "unsafe_archive"
    assert _err(load_history, _zip(tmp_path / "b.zip", {"/abs/epoch_1.safetensors": st}),
                lm).code == "unsafe_archive"
    link = zipfile.ZipInfo("epoch_2.safetensors")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as zf:
        zf.writestr("epoch_1.safetensors", st)
        zf.writestr(link, "/etc/passwd")
    assert _err(load_history, tmp_path / "c.zip", lm).code == "unsafe_archive"
    assert _err(load_history, _zip(tmp_path / "d.zip", {"readme.txt": b"hi"}),
                lm).code == "history_empty"
    (tmp_path / "e.zip").write_bytes(b"not a zip")
    assert _err(load_history, tmp_path / "e.zip", lm).code == "history_unreadable"
    assert _err(load_history, _zip(tmp_path / "f.zip", {"final.safetensors": st}),
                lm).code == "history_order"
    assert _err(load_history, _zip(tmp_path / "g.zip", {"epoch_1.safetensors": b"garbage"}),
                lm).code == "history_unreadable"


def test_history_for_transposed_onnx_weights(tmp_path):
    proto, inits = _conv_gemm(trans_b=0)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    lm = load_model(tmp_path / "m.onnx")
    state = {k: torch.from_numpy(v) + 1 for k, v in inits.items()}  # canonical layout
    hist = load_history(_zip(tmp_path / "h.zip", {"epoch_1.safetensors": _st_bytes(state)}), lm)
    gm_w = hist[0].state[lm.name_map["fc.w"]]
    assert torch.equal(gm_w, state["fc.w"].t())


def test_onnx_with_external_data_is_refused(tmp_path):
    proto, _ = _conv_gemm(trans_b=1)
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    e = _err(load_model, tmp_path / "ext.onnx")
    assert e.code == "unsupported_model" and "external data" in e.message
