"""receive_form and its pace at their edges, driven message by message: a stand-in request hands
the ASGI body messages over one at a time on a clock the test moves, so what is parsed when,
what is drained after a refusal, and when a slow body is cut are exact. Plus the duplicate-field
rule for text fields, the filename suffix rule and the upload's hold on its staging folder."""
from __future__ import annotations

import functools
import types

import anyio
import pytest

from service.api import uploads
from service.api.uploads import StagingFull, UploadTooSlow, _Pace, _suffix, receive_form

from .conftest import submit_files
from .test_uploads import _assert_problem

B = "edgeboundary"
KiB = 1024


def _part(name: str, data: bytes, filename: str | None = None) -> bytes:
    fn = f'; filename="{filename}"' if filename else ""
    return (f'--{B}\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n\r\n'.encode() + data
            + f"\r\n--{B}--\r\n".encode())


def _body(payload: bytes) -> bytes:
    return _part("model", payload, "m.onnx")


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def _clock(monkeypatch) -> Clock:
    """A test clock that uploads.py reads as time.monotonic."""
    clock = Clock()
    monkeypatch.setattr(uploads, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


class Request:
    """What receive_form reads of a request: its headers and its ASGI receive()."""

    def __init__(self, pieces, *, declared: int | None = None, clock: Clock | None = None,
                 step_s: float = 0.0) -> None:
        self.headers = {"content-type": f"multipart/form-data; boundary={B}"}
        if declared is not None:
            self.headers["content-length"] = str(declared)
        self.pieces, self.received, self.clock, self.step_s = iter(pieces), 0, clock, step_s
        self.last = None

    async def receive(self) -> dict:
        if self.clock is not None:
            self.clock.now += self.step_s
        body, more = next(self.pieces)
        self.received += 1
        return {"type": "http.request", "body": body, "more_body": more}


def _messages(pieces: list[bytes]) -> list[tuple[bytes, bool]]:
    return [(p, i < len(pieces) - 1) for i, p in enumerate(pieces)]


class Budget:
    """Stands in for the admission ticket: records holds and charges, can refuse up front."""

    def __init__(self, request: Request | None = None, full: bool = False) -> None:
        self.request, self.full = request, full
        self.held, self.charged_at = [], []

    def hold(self, staging) -> None:
        self.held.append(staging)

    def room_for(self, n: int) -> None:
        if self.full:
            raise StagingFull(100, 100, n)

    def charge(self, n: int) -> None:
        self.charged_at.append((self.request.received if self.request else None, n))


def _receive(request, settings, staging, budget=None):
    return anyio.run(functools.partial(receive_form, request, settings, staging, budget))


@pytest.fixture
def small(settings):
    return settings.model_copy(update={"upload_chunk_bytes": 4 * KiB,
                                       "upload_min_rate_bytes_s": 0})


def test_a_body_is_parsed_and_charged_as_it_arrives_not_at_its_end(small, tmp_path):
    payload = bytes(range(256)) * 256  # 64 KiB
    pieces = _pieces(_body(payload), 4 * KiB)
    req = Request(_messages(pieces))
    budget = Budget(req)
    form = _receive(req, small, tmp_path / "st", budget)
    assert budget.held == [tmp_path / "st"]  # locked against the orphan sweep first
    assert form.files["model"].size == len(payload)
    assert form.files["model"].path.read_bytes() == payload
    # one charge per piece, each made while that piece was the newest one received
    assert [at for at, _ in budget.charged_at] == list(range(1, len(pieces) + 1))
    assert sum(n for _, n in budget.charged_at) == len(_body(payload))


def test_a_refused_body_is_drained_to_its_end_so_the_client_reads_the_answer(small, tmp_path):
    pieces = _pieces(_body(bytes(32 * KiB)), 4 * KiB)
    req = Request(_messages(pieces), declared=len(_body(bytes(32 * KiB))))
    with pytest.raises(StagingFull):
        _receive(req, small, tmp_path / "st", Budget(req, full=True))
    assert req.received == len(pieces)


def test_draining_stops_past_its_cap(small, tmp_path):
    mib = bytes(1024 * KiB)
    forever = ((mib, True) for _ in range(10_000))
    req = Request(forever, declared=1000)
    with pytest.raises(StagingFull):
        _receive(req, small, tmp_path / "st", Budget(req, full=True))
    assert req.received == uploads.DRAIN_BYTES // len(mib) + 1  # the first piece past the cap


def test_time_the_server_spends_parsing_is_not_a_free_pass_for_the_client(small, tmp_path,
                                                                          monkeypatch):
    """10,000 B/s over 1 s windows; the client sends 4 KiB every 0.6 s (6.8 KB/s) and parsing
    takes no time on this clock: the second window check cuts the body."""
    clock = _clock(monkeypatch)
    s = small.model_copy(update={"upload_min_rate_bytes_s": 10_000, "upload_rate_window_s": 1.0})
    pieces = _pieces(_body(bytes(64 * KiB)), 4 * KiB)
    req = Request(_messages(pieces), clock=clock, step_s=0.6)
    with pytest.raises(UploadTooSlow) as e:
        _receive(req, s, tmp_path / "st")
    assert e.value.reason == "rate" and req.received == 2




def test_the_deadline_is_met_until_its_last_instant(settings, monkeypatch):
    kw = {"upload_deadline_s": 10.0, "upload_min_rate_bytes_s": 0}
    clock = _clock(monkeypatch)
    clock.now = 2.0  # the body starts at 2.0 on this clock
    pace = _Pace(settings.model_copy(update=kw))
    assert pace.wait_s() == 10.0  # no rate: only the deadline bounds a wait
    clock.now = 11.999
    pace.check()
    clock.now = 12.0
    with pytest.raises(UploadTooSlow) as e:
        pace.check()
    assert e.value.reason == "deadline" and e.value.elapsed_s == 10.0


def test_each_rate_window_must_bring_its_bytes_and_then_a_new_one_begins(settings, monkeypatch):
    kw = {"upload_deadline_s": 100.0, "upload_min_rate_bytes_s": 100, "upload_rate_window_s": 2.0}
    clock = _clock(monkeypatch)
    clock.now = 3.0  # the body starts at 3.0 on this clock
    pace = _Pace(settings.model_copy(update=kw))
    assert pace.wait_s() == 2.0
    pace.got(200)  # exactly min rate x window
    clock.now = 5.0
    pace.check()  # passes, and the next window runs to 7.0 with a fresh count
    assert pace.window_end == 7.0 and pace.window_bytes == 0
    pace.server_time(1.5)  # the server's own time moves the window's end, not the deadline
    clock.now = 8.0
    assert pace.wait_s() == 0.5 and pace.deadline == 103.0
    pace.got(199)
    clock.now = 8.5
    with pytest.raises(UploadTooSlow) as e:
        pace.check()
    assert e.value.reason == "rate" and e.value.received == 399 and e.value.elapsed_s == 5.5
    short = _Pace(settings.model_copy(update=kw))  # a first window one byte short
    short.got(199)
    clock.now = 10.5
    with pytest.raises(UploadTooSlow):
        short.check()


def test_a_declared_length_may_reach_the_whole_body_limit_but_not_pass_it(small, tmp_path):
    """The whole body: every file's limit, twice the text limit and 64 KiB of framing."""
    total = (sum(small.limit_for(f) for f in ("model", "history", "data"))
             + 2 * small.max_config_bytes + 64 * KiB)
    body = _body(b"onnx")
    form = _receive(Request([(body, False)], declared=total), small, tmp_path / "a")
    assert form.files["model"].size == 4
    with pytest.raises(uploads.UploadTooLarge) as e:
        _receive(Request([(body, False)], declared=total + 1), small, tmp_path / "b")
    assert e.value.field == "request body" and e.value.limit == total


def test_a_text_field_sent_twice_is_refused(client, settings, subject_bytes):
    files, data = submit_files(subject_bytes)
    again = list(files.items()) + [("dataset", (None, data["dataset"]))]  # a plain form field
    _assert_problem(client.post("/v1/jobs", files=again, data=data), 422, "duplicate_field",
                    "dataset")


@pytest.mark.parametrize("filename, suffix", [
    ("model.ONNX", ".onnx"), ("runs/v1.2/model.pt2", ".pt2"), ("C:\\a.b\\history.zip", ".zip"),
    ("dir.v2/model", ""), ("a.tar\\data", ""), ("noext", ""), ("x/y.z/w.npz", ".npz")])
def test_the_suffix_is_the_last_one_of_the_last_path_component(filename, suffix):
    assert _suffix(filename) == suffix



def test_an_endless_part_header_is_refused_as_a_bad_form(small, tmp_path):
    """python-multipart refuses a header over 4,224 bytes itself; MAX_PART_HEADER_BYTES (16 KiB)
    is the service's own bound should a parser ever allow more. Either way: a 4xx, not memory."""
    pad = "x" * (4 * uploads.MAX_PART_HEADER_BYTES)
    body = (f'--{B}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"; '
            f'p="{pad}"\r\n\r\nonnx\r\n--{B}--\r\n').encode()
    with pytest.raises(uploads.InputError) as e:
        _receive(Request([(body, False)]), small, tmp_path / "st")
    assert e.value.code == "invalid_multipart"


@pytest.mark.parametrize("cut", ["file", "text"])
def test_a_body_that_ends_inside_a_part_is_incomplete(small, tmp_path, cut):
    if cut == "file":
        body = f'--{B}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\nonnx'
    else:
        body = f'--{B}\r\nContent-Disposition: form-data; name="dataset"\r\n\r\ndigi'
    with pytest.raises(uploads.InputError) as e:
        _receive(Request([(body.encode(), False)]), small, tmp_path / "st")
    assert e.value.code == "incomplete_upload"


@pytest.mark.parametrize("location, code", [
    ("/etc/passwd", "unsafe_model"), ("\\\\host\\share", "unsafe_model"),
    ("dir\\w.bin", "unsafe_model"), ("C:w.bin", "unsafe_model"), ("../w.bin", "unsafe_model"),
    ("a/../../w.bin", "unsafe_model"), ("w.bin", "unsupported_model"),
    ("dir/w..bin", "unsupported_model")])
def test_onnx_external_data_is_never_opened_and_escaping_paths_are_named_an_attack(location,
                                                                                    code):
    import onnx
    from onnx import TensorProto, helper

    t = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    inside = helper.make_tensor("inside", TensorProto.FLOAT, [1], [1.0])  # looked past, first
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[inside, t]))
    assert onnx.external_data_helper.uses_external_data(t)
    with pytest.raises(uploads.InputError) as e:
        uploads._check_onnx_external_data(model, "m.onnx")
    assert e.value.code == code and repr(location) in str(e.value)


@pytest.mark.parametrize("field, size, ok", [("model", 100, True), ("model", 101, False),
                                             ("config", 100, True), ("config", 101, False)])
def test_a_file_or_text_field_may_fill_its_limit_but_not_pass_it(small, tmp_path, field, size,
                                                                  ok):
    s = small.model_copy(update={"max_model_bytes": 100, "max_config_bytes": 100})
    body = _part(field, b"{" * size, "m.onnx" if field == "model" else None)
    req = Request([(body, False)])
    if ok:
        form = _receive(req, s, tmp_path / "st")
        assert (form.files[field].size if field == "model" else len(form.fields[field])) == size
    else:
        with pytest.raises(uploads.UploadTooLarge) as e:
            _receive(req, s, tmp_path / "st")
        assert e.value.field == field and e.value.limit == 100


def test_a_text_field_that_is_not_utf8_is_refused(small, tmp_path):
    with pytest.raises(uploads.InputError) as e:
        _receive(Request([(_part("config", b"\xff\xfe{}"), False)]), small, tmp_path / "st")
    assert e.value.code == "invalid_field"


def test_a_body_refused_mid_way_is_drained_too(small, tmp_path):
    """The staging budget runs out while the file arrives: the rest is read away, then the
    refusal is answered."""
    pieces = _pieces(_body(bytes(32 * KiB)), 4 * KiB)
    req = Request(_messages(pieces))

    class RunsOut(Budget):
        def charge(self, n: int) -> None:
            if req.received >= 3:
                raise StagingFull(100, 100, n)

    with pytest.raises(StagingFull):
        _receive(req, small, tmp_path / "st", RunsOut(req))
    assert req.received == len(pieces)
    assert uploads.DRAIN_BYTES >= 1024 * KiB  # enough to read away a typical refused upload


def test_a_window_that_passes_its_check_while_the_client_is_quiet_keeps_waiting(
        small, tmp_path, monkeypatch):
    """The next piece is late past a window's end; that window brought enough, so the check
    passes, a new window starts, and the wait goes on until the piece arrives."""
    clock = _clock(monkeypatch)
    s = small.model_copy(update={"upload_min_rate_bytes_s": 1, "upload_rate_window_s": 0.2})
    body = _body(b"onnx")
    first, last = body[:-10], body[-10:]

    class Quiet(Request):
        async def receive(self) -> dict:
            self.received += 1
            if self.received == 2:  # the client is quiet past the window's end (0.2)
                clock.now = 0.2
                await anyio.sleep(30)  # cut by the pace's timer
            return {"type": "http.request", "body": first if self.received == 1 else last,
                    "more_body": self.received == 1}

    form = _receive(Quiet([]), s, tmp_path / "st")
    assert form.files["model"].size == 4


def test_a_part_without_a_form_data_name_is_a_bad_form(small, tmp_path):
    for disp in ('form-data; filename="m.onnx"', 'attachment; name="model"'):
        body = f"--{B}\r\nContent-Disposition: {disp}\r\n\r\nonnx\r\n--{B}--\r\n".encode()
        with pytest.raises(uploads.InputError) as e:
            _receive(Request([(body, False)]), small, tmp_path / "st")
        assert e.value.code == "invalid_multipart", disp


@pytest.mark.parametrize("ctype", ["multipart/form-data", "text/plain; boundary=x"])
def test_only_multipart_with_a_boundary_is_read(small, tmp_path, ctype):
    req = Request([(_body(b"onnx"), False)])
    req.headers["content-type"] = ctype
    with pytest.raises(uploads.UnsupportedMediaType):
        _receive(req, small, tmp_path / "st")
    assert req.received == 0


def test_a_client_too_slow_while_its_refusal_is_drained_gets_the_refusal(small, tmp_path,
                                                                         monkeypatch):
    clock = _clock(monkeypatch)
    s = small.model_copy(update={"upload_deadline_s": 10.0})

    class Stalls(Request):
        async def receive(self) -> dict:
            self.received += 1
            if self.received == 1:
                return {"type": "http.request", "body": b"x" * 100, "more_body": True}
            if self.received > 2:
                raise AssertionError("read on after the deadline")
            clock.now = 100.0  # the deadline passes while the client is quiet
            await anyio.sleep(30)

    req = Stalls([], declared=1000)
    with pytest.raises(StagingFull):
        _receive(req, s, tmp_path / "st", Budget(req, full=True))


def test_the_zip_limits_default_cannot_be_changed_in_place():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        uploads.ZipLimits().max_ratio = 1e9


def test_a_form_can_be_discarded_twice(small, tmp_path):
    form = _receive(Request([(_body(b"onnx"), False)]), small, tmp_path / "st")
    form.discard()
    form.discard()  # the cleanup path may run after the folder is gone
    assert not (tmp_path / "st").exists()


def test_a_streamed_body_may_reach_the_whole_body_limit_but_not_pass_it(small, tmp_path):
    """Without a declared length the limit is counted over the body as it arrives: a body of
    exactly the limit (here padded after the closing boundary, where the parser skips bytes) is
    read; one byte more is refused."""
    total = (sum(small.limit_for(f) for f in ("model", "history", "data"))
             + 2 * small.max_config_bytes + 64 * KiB)
    body = _body(b"onnx")
    exact = body + b"x" * (total - len(body))
    form = _receive(Request(_messages(_pieces(exact, 64 * KiB))), small, tmp_path / "a")
    assert form.files["model"].path.read_bytes() == b"onnx"
    with pytest.raises(uploads.UploadTooLarge) as e:
        _receive(Request(_messages(_pieces(exact + b"x", 64 * KiB))), small, tmp_path / "b")
    assert e.value.field == "request body" and e.value.limit == total
