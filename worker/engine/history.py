"""Load the training history: one zip of per-epoch checkpoints (DESIGN.md, Formats).

Members may be ``.safetensors``, ``.pt``/``.pth`` state dicts (``torch.load(weights_only=True)``
only: a pickle that needs code is refused, never run), ``.pt2`` archives (only in the layout
``torch.export.save`` writes, :mod:`worker.engine.pt2_layout`) or ``.onnx`` files; their
tensor names are the model's canonical names (state-dict names for ``.pt2`` models, initializer
names for ONNX models). The order is the epoch number in the file names (``epoch_3``,
``ckpt-12``, ...) or the order of a ``manifest.json`` that lists the files.

Members are read into memory by name; nothing is extracted, and names that could escape a
directory ('..', absolute paths, backslashes, drive letters) or are symlinks are refused anyway,
since such an archive is either broken or hostile. Zip bombs: the declared sizes are capped up
front and the bytes actually decompressed again while reading (declared sizes can lie).
"""
from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .archive_safety import CAPS, ReadBudget, check_ratio, unsafe_name_reason
from .errors import InputError
from .modelio import LoadedModel

CHECKPOINT_EXTS = (".safetensors", ".pt", ".pth", ".pt2", ".onnx")
_HINT = ("the history is a .zip of per-epoch checkpoints (.safetensors, .pt state dicts, .pt2 or "
         ".onnx) of this model, named with their epoch (epoch_1.safetensors, ...) or listed in "
         "order in a manifest.json")
_EPOCH_WORD = re.compile(r"(?<![a-z])(?:epoch|ep|ckpt|checkpoint|step|iter)[_\-. ]?(\d+)", re.I)
_NUMBER = re.compile(r"\d+")


@dataclass
class Checkpoint:
    epoch: int
    name: str  # the member's name in the zip
    state: dict[str, torch.Tensor]  # GM naming, ready for gm.load_state_dict(state, strict=False)


def load_history(zip_path, model: LoadedModel, workdir=None) -> list[Checkpoint]:
    """Every checkpoint in the zip, validated against ``model`` and sorted by epoch.

    ``workdir`` is accepted for callers that want a scratch directory; members are read into
    memory, so nothing is written there.
    """
    zip_path = Path(zip_path)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError("history_unreadable",
                         f"history file '{zip_path.name}' is not a readable zip archive: {e}",
                         _HINT) from None
    with zf:
        members = _safe_members(zf, zip_path.name)
        ordered = _order(zf, members, zip_path.name)
        if not ordered:
            raise InputError(
                "history_empty",
                f"history file '{zip_path.name}' contains no checkpoints "
                f"({', '.join(CHECKPOINT_EXTS)})",
                _HINT,
            )
        expected = model.canonical_shapes
        params = model.param_names
        dtypes = {c: t.dtype for c, t in model.canonical_state(model.gm.state_dict()).items()}
        out = []
        budget = ReadBudget(f"history file '{zip_path.name}'", CAPS.max_total, CAPS.max_ratio)
        for epoch, info in ordered:
            tensors = _read_member(zf, info, budget)
            canonical = _validate(info.filename, tensors, expected, params, dtypes)
            out.append(Checkpoint(epoch=epoch, name=info.filename, state=model.gm_state(canonical)))
    return out


def _safe_members(zf: zipfile.ZipFile, zname: str) -> list[zipfile.ZipInfo]:
    members, total = [], 0
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name).parts
        why = unsafe_name_reason(info)
        if why:
            raise InputError("unsafe_archive",
                             f"history file '{zname}' has the member '{name}', which {why}", _HINT)
        if info.is_dir() or parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue
        check_ratio(info, info.file_size, f"history file '{zname}'", CAPS.max_ratio)
        total += info.file_size
        if total > CAPS.max_total:
            raise InputError("history_too_large",
                             f"history file '{zname}' unpacks to more than {CAPS.max_total} "
                             "bytes (DARE_MAX_HISTORY_UNCOMPRESSED_BYTES)", _HINT)
        members.append(info)
    return members


def _order(zf, members, zname) -> list[tuple[int, zipfile.ZipInfo]]:
    ckpts = [m for m in members if m.filename.lower().endswith(CHECKPOINT_EXTS)]
    manifests = sorted((m for m in members if PurePosixPath(m.filename).name == "manifest.json"),
                       key=lambda m: m.filename.count("/"))
    if manifests:
        listed = _from_manifest(zf, manifests[0], ckpts, zname)
        if listed is not None:
            return listed
    by_epoch: dict[int, zipfile.ZipInfo] = {}
    for m in ckpts:
        epoch = epoch_of(m.filename)
        if epoch is None:
            raise InputError(
                "history_order",
                f"history file '{zname}': cannot tell the epoch of '{m.filename}' (no number "
                "in its name)",
                "name checkpoints with their epoch (epoch_3.safetensors) or add a manifest.json "
                'listing them in order: {"checkpoints": ["a.safetensors", "b.safetensors"]}',
            )
        if epoch in by_epoch:
            raise InputError(
                "history_order",
                f"history file '{zname}': '{by_epoch[epoch].filename}' and '{m.filename}' both "
                f"claim epoch {epoch}",
                "keep one checkpoint per epoch, or order them with a manifest.json",
            )
        by_epoch[epoch] = m
    return sorted(by_epoch.items(), key=lambda kv: kv[0])


def epoch_of(filename: str) -> int | None:
    """The epoch number in a checkpoint's file name: after a word such as 'epoch'/'ckpt' if one
    is there (``model_epoch12_acc93`` -> 12), else the last number (``weights-007`` -> 7)."""
    stem = PurePosixPath(filename).name
    for ext in CHECKPOINT_EXTS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    m = _EPOCH_WORD.search(stem)
    if m:
        return int(m.group(1))
    nums = _NUMBER.findall(stem)
    return int(nums[-1]) if nums else None


def _from_manifest(zf, man, ckpts, zname) -> list[tuple[int, zipfile.ZipInfo]] | None:
    """Ordered checkpoints from manifest.json, or None when it lists none (metadata only)."""
    try:
        data = json.loads(zf.read(man).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError("history_manifest",
                         f"history file '{zname}': '{man.filename}' is not valid JSON: {e}",
                         _HINT) from None
    if isinstance(data, list):
        entries = data
    elif isinstance(data, dict):
        entries = data.get("checkpoints")
    else:
        entries = None
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries:
        raise InputError("history_manifest",
                         f"history file '{zname}': '{man.filename}' must list the checkpoints in "
                         '"checkpoints" (a list of file names or {"file", "epoch"} objects)', _HINT)
    base = str(PurePosixPath(man.filename).parent)
    by_name = {m.filename: m for m in ckpts}
    out, seen = [], set()
    for i, e in enumerate(entries):
        fname = e.get("file") if isinstance(e, dict) else e
        if not isinstance(fname, str):
            raise InputError("history_manifest",
                             f"history file '{zname}': manifest entry {i} names no file", _HINT)
        full = fname if base in ("", ".") else f"{base}/{fname}"
        info = by_name.get(full) or by_name.get(fname)
        if info is None:
            raise InputError("history_manifest",
                             f"history file '{zname}': manifest lists '{fname}', which is not a "
                             f"checkpoint in the archive", _HINT)
        if info.filename in seen:
            raise InputError("history_manifest",
                             f"history file '{zname}': manifest lists '{fname}' twice", _HINT)
        seen.add(info.filename)
        epoch = e.get("epoch") if isinstance(e, dict) else None
        out.append((int(epoch) if isinstance(epoch, (int, float)) else i + 1, info))
    return out


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: ReadBudget
                 ) -> dict[str, torch.Tensor]:
    name = info.filename
    ext = PurePosixPath(name.lower()).suffix
    try:
        raw = budget.read_member(zf, info)
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:
        raise InputError("history_unreadable", f"checkpoint '{name}' cannot be read: {e}",
                         _HINT) from None
    try:
        if ext == ".safetensors":
            from safetensors.torch import load

            return load(raw)
        if ext in (".pt", ".pth"):
            return _load_pt(raw, name)
        if ext == ".pt2":
            from .modelio import check_pt2_archive

            try:
                check_pt2_archive(raw, f"checkpoint '{name}'")
            except InputError as e:
                code = {"unsafe_model": "unsafe_checkpoint", "unsafe_archive": "unsafe_archive",
                        "zip_bomb": "zip_bomb"}.get(e.code, "history_unreadable")
                raise InputError(code, e.message, e.hint) from None
            ep = torch.export.load(io.BytesIO(raw))
            return {k: v.detach() for k, v in ep.state_dict.items()}
        if ext == ".onnx":
            import onnx

            from .modelio import check_no_external_data, normalize_onnx, onnx_initializers

            proto = onnx.load_from_string(raw)
            try:
                check_no_external_data(proto, f"checkpoint '{name}'")
            except InputError as e:
                raise InputError("history_unreadable", e.message, e.hint) from None
            return onnx_initializers(normalize_onnx(proto))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - every loader has its own exception types
        raise InputError(
            "history_unreadable",
            f"checkpoint '{name}' is not a readable {ext} file: {type(e).__name__}: {str(e)[:300]}",
            _HINT,
        ) from None
    raise AssertionError(ext)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def _load_pt(raw: bytes, name: str) -> dict[str, torch.Tensor]:
    if zipfile.is_zipfile(io.BytesIO(raw)):
        from .archive_safety import is_torchscript

        with zipfile.ZipFile(io.BytesIO(raw)) as inner:
            if is_torchscript(inner.namelist()):  # torch.load would hand it to torch.jit.load
                raise InputError(
                    "unsafe_checkpoint",
                    f"checkpoint '{name}' is a TorchScript archive (torch.jit.save), which carries "
                    "code; only state dicts are read",
                    "save a plain state dict (torch.save(model.state_dict(), path)) or use "
                    "safetensors")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refuses any global outside its allow-list *before* calling it, so
        # a malicious __reduce__ is never executed; we only report it.
        raise InputError(
            "unsafe_checkpoint",
            f"checkpoint '{name}' is a pickle that needs code to load, which is refused "
            f"({str(e).splitlines()[0][:200]})",
            "save a plain state dict (torch.save(model.state_dict(), path)) or use safetensors",
        ) from None
    if isinstance(obj, dict):
        for k in _WRAPPER_KEYS:  # {"epoch": 3, "state_dict": {...}} and similar
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        raise InputError("history_unreadable",
                         f"checkpoint '{name}' holds a {type(obj).__name__}, not a state dict",
                         "save model.state_dict()")
    out = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if out and all(k.startswith("module.") for k in out):  # saved from nn.DataParallel
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _shape(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ("," if len(s) == 1 else "") + ")"


def _validate(name: str, tensors: dict, expected: dict, params: list[str], dtypes: dict
              ) -> dict[str, torch.Tensor]:
    """Canonical tensors of one checkpoint, in the model's dtypes; InputError on the first bad one.

    Parameters must all be there; buffers (BN running statistics) are checked when present.
    """
    out = {}
    param_set = set(params)
    for c in list(params) + [c for c in expected if c not in param_set]:
        t = tensors.get(c)
        if t is None:
            if c in param_set:
                some = ", ".join(f"'{k}'" for k in list(tensors)[:4]) or "none"
                raise InputError(
                    "history_mismatch",
                    f"checkpoint '{name}': tensor '{c}' is missing (the checkpoint has "
                    f"{len(tensors)} tensors, e.g. {some})",
                    "every checkpoint must hold all of the model's parameters under the model's "
                    "names (state-dict names for .pt2, initializer names for ONNX)",
                )
            continue
        if tuple(t.shape) != tuple(expected[c]):
            raise InputError(
                "history_mismatch",
                f"checkpoint '{name}': tensor '{c}' has shape {_shape(t.shape)} but the model's "
                f"is {_shape(expected[c])}",
                "the history must come from training this same architecture",
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(
                "history_mismatch",
                f"checkpoint '{name}': tensor '{c}' contains NaN or infinite values",
                "drop the diverged checkpoints from the history",
            )
        out[c] = t.detach().to(dtypes[c]) if t.dtype != dtypes[c] else t.detach()
    return out
