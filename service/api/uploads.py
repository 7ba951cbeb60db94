"""Receiving a job submission: stream the multipart body to disk, then check it cheaply.

Files never sit in memory whole: the body is fed to python-multipart's streaming parser in
~1 MiB pieces, and each file part is hashed and written as it arrives. Size limits are enforced
while streaming, cumulatively over the pieces, so a body without ``Content-Length`` (chunked) is
cut off at the limit too, per file and for the whole body. The body also runs against a clock
(:class:`_Pace`): a total deadline and a least average rate over consecutive windows, so a client
that trickles bytes is cut with :class:`UploadTooSlow` (408) instead of holding its staging files
and a connection for ever. Staged bytes are charged to the staging disk's budget as they arrive
(``service.api.admission``).
Files land in ``<staging>/inputs/`` under the engine's names (model.onnx, history.zip, data.npz),
the layout of a job directory, so the inspector (service.api.inspection) loads them with the
engine's own code.

The checks here need no torch and never run code from the upload: formats, zip member names,
zip-bomb caps, ONNX external-data locations. Deeper ones happen in the inspector's process.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from service.api import metrics
from service.settings import Settings
from worker.engine.archive_safety import (
    MAX_RATIO,
    MAX_UNCOMPRESSED_BYTES,
    check_members,
    is_torchscript,
)
from worker.engine.errors import InputError

FILE_FIELDS = {"model": (".onnx", ".pt2"), "history": (".zip",), "data": (".npz",)}
TEXT_FIELDS = ("dataset", "config")
NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".pt2", ".onnx")
# After a limit is hit, keep reading (and dropping) this much so the client sees the 413
# instead of a reset connection; beyond it the connection is cut.
DRAIN_BYTES = 64 * 1024 * 1024
# A part's headers are a few hundred bytes; the parser hands them over unbounded.
MAX_PART_HEADER_BYTES = 16 * 1024


class UploadTooLarge(Exception):
    def __init__(self, field: str, limit: int) -> None:
        super().__init__(f"{field} is larger than the limit of {limit} bytes")
        self.field = field
        self.limit = limit


class UnsupportedMediaType(Exception):
    pass


class UploadTooSlow(Exception):
    """The body missed its deadline (``reason="deadline"``) or arrived slower than the least
    rate over a window (``reason="rate"``)."""

    def __init__(self, reason: str, received: int, elapsed_s: float, settings: Settings) -> None:
        super().__init__(f"upload too slow ({reason}): {received} bytes in {elapsed_s:.1f} s")
        self.reason = reason
        self.received = received
        self.elapsed_s = elapsed_s
        self.min_rate = settings.upload_min_rate_bytes_s
        self.window_s = settings.upload_rate_window_s
        self.deadline_s = settings.upload_deadline_s


class StagingFull(Exception):
    """The staging disk's budget (DARE_STAGING_MAX_BYTES) has no room for these bytes now."""

    def __init__(self, budget: int, in_use: int, wanted: int) -> None:
        super().__init__(f"staging holds {in_use} of {budget} bytes; {wanted} more do not fit")
        self.budget = budget
        self.in_use = in_use
        self.wanted = wanted


class StagingTicket(Protocol):
    """What receive_form needs of ``service.api.admission.Ticket``."""

    def hold(self, staging: Path) -> None: ...

    def room_for(self, n: int) -> None: ...

    def charge(self, n: int) -> None: ...


class _Pace:
    """The body's clock. Each window of ``upload_rate_window_s`` must bring at least
    ``min rate x window`` bytes (the first window is the grace), and the whole body must arrive
    within ``upload_deadline_s``. Time the server spends parsing and writing is not the
    client's: it moves the window's end, not the deadline."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.start = time.monotonic()
        self.deadline = self.start + settings.upload_deadline_s
        self.min_rate = settings.upload_min_rate_bytes_s
        self.window = settings.upload_rate_window_s
        self.window_end = self.start + self.window
        self.window_bytes = 0
        self.received = 0

    def wait_s(self) -> float:
        """How long to wait for the next piece before the body is due for a check."""
        end = min(self.deadline, self.window_end if self.min_rate else math.inf)
        return max(0.0, end - time.monotonic())

    def got(self, n: int) -> None:
        self.received += n
        self.window_bytes += n

    def server_time(self, seconds: float) -> None:
        self.window_end += seconds

    def check(self) -> None:
        now = time.monotonic()
        if now >= self.deadline:
            raise UploadTooSlow("deadline", self.received, now - self.start, self.settings)
        if self.min_rate and now >= self.window_end:
            if self.window_bytes < self.min_rate * self.window:
                raise UploadTooSlow("rate", self.received, now - self.start, self.settings)
            self.window_end, self.window_bytes = now + self.window, 0


@dataclass
class ReceivedFile:
    field: str
    filename: str       # as the client sent it
    suffix: str         # ".onnx", ".pt2", ".zip", ".npz"
    path: Path
    size: int = 0
    sha256: str = ""


@dataclass
class ReceivedForm:
    staging: Path
    files: dict[str, ReceivedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class _FormSink:
    """python-multipart callbacks that write file parts to ``staging``, enforcing limits."""

    def __init__(self, settings: Settings, staging: Path) -> None:
        self.settings = settings
        self.form = ReceivedForm(staging=staging)
        self._headers: dict[str, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._file: IO[bytes] | None = None
        self._hash = None
        self._current: ReceivedFile | None = None
        self._text_name: str | None = None
        self._text = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self._headers = {}
        self._hname = self._hvalue = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]
        self._check_header_size()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]
        self._check_header_size()

    def _check_header_size(self) -> None:
        if len(self._hname) + len(self._hvalue) > MAX_PART_HEADER_BYTES:
            raise InputError("invalid_multipart",
                             f"a part header is longer than {MAX_PART_HEADER_BYTES} bytes",
                             "send multipart/form-data as curl -F or requests' files= do")

    def _header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue
        self._hname = self._hvalue = b""

    def _headers_finished(self) -> None:
        disp, params = parse_options_header(self._headers.get("content-disposition"))
        if disp != b"form-data" or b"name" not in params:
            raise InputError("invalid_multipart", "a part has no form-data name",
                             "send multipart/form-data as curl -F or requests' files= do")
        name = params[b"name"].decode("utf-8", "replace")
        if name in self.form.files or name in self.form.fields or name == self._text_name:
            raise InputError("duplicate_field", f"the form field {name!r} was sent twice",
                             "send each field once")
        if name in FILE_FIELDS:
            filename = params.get(b"filename", b"").decode("utf-8", "replace")
            suffix = _suffix(filename)
            if not filename:
                raise InputError("invalid_field", f"{name!r} must be a file upload, not a text field",
                                 f"send it as a file, e.g. curl -F {name}=@path")
            allowed = FILE_FIELDS[name]
            if suffix not in allowed:
                raise InputError(
                    "unsupported_file_type",
                    f"{name!r} must be a {' or '.join(allowed)} file; got {filename!r}",
                    _FORMAT_HINT[name])
            path = self.form.staging / "inputs" / f"{name}{suffix}"
            self._current = ReceivedFile(field=name, filename=filename, suffix=suffix, path=path)
            self._file = path.open("wb")
            self._hash = hashlib.sha256()
        elif name in TEXT_FIELDS:
            self._text_name = name
            self._text = bytearray()
        else:
            raise InputError("unknown_field", f"unknown form field {name!r}",
                             "the fields are model, history, data, dataset and config")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._current is not None:
            self._current.size += len(chunk)
            metrics.count_upload_bytes(self._current.field, len(chunk))
            limit = self.settings.limit_for(self._current.field)
            if self._current.size > limit:
                raise UploadTooLarge(self._current.field, limit)
            self._hash.update(chunk)
            self._file.write(chunk)
        elif self._text_name is not None:
            self._text += chunk
            if len(self._text) > self.settings.max_config_bytes:
                raise UploadTooLarge(self._text_name, self.settings.max_config_bytes)

    def _part_end(self) -> None:
        if self._current is not None:
            self._file.close()
            self._current.sha256 = self._hash.hexdigest()
            self.form.files[self._current.field] = self._current
            self._current = self._file = self._hash = None
        elif self._text_name is not None:
            try:
                self.form.fields[self._text_name] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("invalid_field", f"{self._text_name!r} is not UTF-8 text",
                                 "send UTF-8") from None
            self._text_name = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


_FORMAT_HINT = {
    "model": "export the classifier with torch.onnx.export (opset <= 17) or torch.export.save (.pt2)",
    "history": "zip the per-epoch checkpoints (.safetensors, .pt state dicts, .pt2 or .onnx)",
    "data": "save the splits with numpy.savez(x_train=..., y_train=..., x_val=..., y_val=..., "
            "x_test=..., y_test=...), or send the form field dataset=digits|mnist5k|fashion instead",
}


def _suffix(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].lower()
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


async def receive_form(request: Request, settings: Settings, staging: Path,
                       budget: StagingTicket | None = None) -> ReceivedForm:
    """Stream the multipart body into ``staging``; raise InputError / UploadTooLarge /
    UnsupportedMediaType / UploadTooSlow, or StagingFull from ``budget``.
    The caller owns ``staging`` (and removes it, whatever happens)."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UnsupportedMediaType()
    total_limit = (sum(settings.limit_for(f) for f in FILE_FIELDS)
                   + 2 * settings.max_config_bytes + 64 * 1024)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > total_limit:
        raise UploadTooLarge("request body", total_limit)
    error: Exception | None = None
    if declared and declared.isdigit() and budget is not None:
        try:  # an early answer; the bytes are charged as they arrive
            budget.room_for(int(declared))
        except StagingFull as e:
            error = e  # answered after draining, like every refusal mid-body

    if budget is not None:
        budget.hold(staging)  # created and locked against the orphan sweep (service.api.staging)
    (staging / "inputs").mkdir(parents=True, exist_ok=True)
    sink = _FormSink(settings, staging)
    parser = MultipartParser(params[b"boundary"], sink.callbacks())
    pace = _Pace(settings)
    buf = bytearray()
    drained = 0

    async def feed(data: bytes) -> None:
        step = settings.upload_chunk_bytes  # a big message is parsed in pieces of this size too
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            if budget is not None:
                budget.charge(len(piece))  # before writing: the budget is for disk
            t0 = time.monotonic()
            await run_in_threadpool(parser.write, piece)
            pace.server_time(time.monotonic() - t0)

    try:
        while True:
            try:
                chunk, more = await _next_piece(request, pace)
            except UploadTooSlow:
                if error is not None:
                    break  # draining for the answer we owe already: stop there
                raise
            if error is not None:  # drop the rest so the client can read our answer
                drained += len(chunk)
                if drained > DRAIN_BYTES or not more:
                    break
                continue
            buf += chunk
            over = pace.received > total_limit  # counted over the whole body, chunked or not
            if len(buf) >= settings.upload_chunk_bytes or over or (buf and not more):
                try:  # first, so that a file over its own limit is the error that is named
                    await feed(bytes(buf))
                except (InputError, UploadTooLarge, StagingFull) as e:
                    error = e
                buf.clear()
            if over and error is None:
                error = UploadTooLarge("request body", total_limit)
            if not more:
                break
        if error is None:
            parser.finalize()
    except ClientDisconnect:
        raise InputError("incomplete_upload", "the client closed the connection mid-upload",
                         "retry the request") from None
    except MultipartParseError as e:
        raise InputError("invalid_multipart", f"the multipart body cannot be parsed: {e}",
                         "send multipart/form-data as curl -F or requests' files= do") from None
    finally:
        sink.close()
    if error is not None:
        raise error
    if sink._current is not None or sink._text_name is not None:
        raise InputError("incomplete_upload", "the multipart body ended inside a part",
                         "retry the request")
    return sink.form


async def _next_piece(request: Request, pace: _Pace) -> tuple[bytes, bool]:
    """The next piece of the body and whether more follows, waiting no longer than the pace
    allows; raises UploadTooSlow or ClientDisconnect. Reads the ASGI messages directly (not
    ``request.stream()``): a wait cut by the timer must leave the receiver usable, and
    uvicorn's ``receive`` keeps what arrived meanwhile for the next call."""
    while True:
        with anyio.move_on_after(pace.wait_s()) as timer:
            message = await request.receive()
        if timer.cancelled_caught:
            pace.check()  # raises when the body is late; else a new window has begun
            continue
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        pace.got(len(chunk))
        more = bool(message.get("more_body", False))
        if more:
            pace.check()
        return chunk, more


# --- cheap format checks (the inspector and the engine's validate stage do the deep ones) -----

@dataclass(frozen=True)
class ZipLimits:
    """Zip-bomb caps (DARE_MAX_HISTORY_UNCOMPRESSED_BYTES, DARE_MAX_ZIP_RATIO)."""

    max_uncompressed: int = MAX_UNCOMPRESSED_BYTES
    max_ratio: float = MAX_RATIO

    @classmethod
    def of(cls, settings: Settings | None) -> "ZipLimits":
        if settings is None:
            return cls()
        return cls(settings.max_history_uncompressed_bytes, settings.max_zip_ratio)


def check_model(f: ReceivedFile, limits: ZipLimits = ZipLimits()) -> str:
    """Return the model format ("onnx" or "pt2")."""
    if f.suffix == ".onnx":
        import onnx
        from google.protobuf.message import DecodeError

        try:
            proto = onnx.load(str(f.path), load_external_data=False)
        except (DecodeError, ValueError, OSError) as e:
            raise InputError("invalid_model", f"model {f.filename!r} is not an ONNX model: {e}",
                             _FORMAT_HINT["model"]) from None
        _check_onnx_external_data(proto, f.filename)
        return "onnx"
    names = _open_zip(f, "invalid_model", "a torch.export archive (a .pt2 is a zip file)", limits)
    # TorchScript runs the code it carries when loaded; say so rather than "corrupt archive".
    if is_torchscript(names):
        raise InputError("unsafe_model", f"model {f.filename!r} is a TorchScript archive "
                         "(torch.jit.save), whose loading runs the code it carries; it is refused",
                         _FORMAT_HINT["model"])
    # Only the layout torch.export.save writes (no pickles with code, no custom objects, no
    # expressions sympy would eval): refused here already, before the inspector sees the file.
    from worker.engine.pt2_layout import check_layout  # torch-free, like the API

    with zipfile.ZipFile(f.path) as zf:
        check_layout(zf, f"model {f.filename!r}", _FORMAT_HINT["model"])
    return "pt2"


def _check_onnx_external_data(proto, filename: str) -> None:  # noqa: ANN001 (onnx.ModelProto)
    """Name the location of any external tensor data: escaping ones are an attack, any other is
    still refused, since the upload is one file and the server never opens paths it names."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for t in _get_all_tensors(proto):
        if not uses_external_data(t):
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        escapes = (location.startswith(("/", "\\")) or "\\" in location or ":" in location
                   or ".." in location.split("/"))
        if escapes:
            raise InputError(
                "unsafe_model",
                f"model {filename!r} keeps the tensor {t.name!r} in the external file "
                f"{location!r}, a path outside the model's directory; it is never opened",
                "send one self-contained .onnx file: onnx.save(model, path, "
                "save_as_external_data=False)")
        raise InputError(
            "unsupported_model",
            f"model {filename!r} keeps the tensor {t.name!r} in the external file {location!r}; "
            "external data (and any link it might be) is never opened",
            "send one self-contained .onnx file: onnx.save(model, path, "
            "save_as_external_data=False); models must be under 2 GB")


def _open_zip(f: ReceivedFile, code: str, what: str, limits: ZipLimits) -> list[str]:
    try:
        with zipfile.ZipFile(f.path) as z:
            check_members(z, f"{f.field} {f.filename!r}", max_total=limits.max_uncompressed,
                          max_ratio=limits.max_ratio, hint=_FORMAT_HINT[f.field])
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise InputError(code, f"{f.field} {f.filename!r} is not {what}",
                         _FORMAT_HINT[f.field]) from None


def check_history(f: ReceivedFile, limits: ZipLimits = ZipLimits()) -> None:
    names = _open_zip(f, "invalid_history", "a zip file", limits)
    if not any(n.lower().endswith(CHECKPOINT_SUFFIXES) for n in names):
        raise InputError("invalid_history",
                         f"history {f.filename!r} holds no checkpoint "
                         f"({', '.join(CHECKPOINT_SUFFIXES)})", _FORMAT_HINT["history"])


def check_data(f: ReceivedFile, limits: ZipLimits = ZipLimits()) -> None:
    names = {n.removesuffix(".npy")
             for n in _open_zip(f, "invalid_data", "an .npz file (a zip of .npy arrays)", limits)}
    missing = [k for k in NPZ_KEYS if k not in names]
    if missing:
        raise InputError("invalid_data", f"data {f.filename!r} lacks the arrays {', '.join(missing)}",
                         _FORMAT_HINT["data"])


def parse_config_field(form: ReceivedForm):  # noqa: ANN201 (HardenConfig)
    from worker.engine.config import parse_config

    raw = form.fields.get("config")
    if raw is not None and raw.strip():
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError("invalid_config", f"config is not valid JSON: {e}",
                             'send a JSON object, e.g. {"q": 0.95}') from None
    else:
        obj = {}
    if not isinstance(obj, dict):
        raise InputError("invalid_config", "config must be a JSON object", 'e.g. {"q": 0.95}')
    dataset = form.fields.get("dataset", "").strip() or None
    if dataset is not None:
        if obj.get("dataset") not in (None, dataset):
            raise InputError("conflicting_dataset",
                             f"the form says dataset={dataset!r} but config says {obj['dataset']!r}",
                             "name the dataset once")
        obj["dataset"] = dataset
    return parse_config(obj)
