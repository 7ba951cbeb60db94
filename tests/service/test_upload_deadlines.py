"""Slow and oversized bodies: a trickling upload is cut with 408 within its rate window or its
deadline (a real uvicorn server, a raw socket that trickles) and leaves no staging behind; the
whole body is capped without Content-Length; size limits add up over parser chunks; staging has
a disk budget (503). Every refusal gives back the tenant's in-flight place and staged bytes."""
from __future__ import annotations

import hashlib
import io
import time
import zipfile
from contextlib import contextmanager

import pytest

from .conftest import RecordingDispatcher, make_key, submit_files, tenant_id
from .live_server import BOUNDARY, RawUpload, part_header, serve

PROBLEM = "application/problem+json"


@contextmanager
def _live(settings):
    from service.api.app import create_app

    app = create_app(settings, dispatcher=RecordingDispatcher())
    try:
        with serve(app) as port:
            yield port, make_key(app.state.ctx.factory, "slow"), app
    finally:
        app.state.ctx.engine.dispose()


def _wait_for(cond, timeout: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _trickle_until_answered(up: RawUpload, every_s: float, piece: bytes, limit_s: float) -> float:
    """Send ``piece`` every ``every_s`` until the server answers; return the seconds it took."""
    t0 = time.monotonic()
    while not up.answered(every_s):
        assert time.monotonic() - t0 < limit_s, f"still open after {limit_s} s"
        up.send(piece)
    return time.monotonic() - t0


def _assert_released(app, settings) -> None:  # noqa: ANN001
    adm = app.state.admission
    assert adm.inflight(tenant_id(app.state.ctx.factory, "slow")) == 0
    assert adm.staged == 0
    assert list(settings.upload_tmp_dir.iterdir()) == []


def test_a_trickling_body_is_cut_with_408_within_the_rate_window(settings):
    window = 1.0
    s = settings.model_copy(update={"upload_min_rate_bytes_s": 1000,
                                    "upload_rate_window_s": window})
    with _live(s) as (port, key, app):
        up = RawUpload(port, key)
        assert up.send(part_header("model", "model.onnx") + b"\x08")
        _wait_for(lambda: any(s.upload_tmp_dir.iterdir()))  # it is being staged
        took = _trickle_until_answered(up, 0.2, b"x", limit_s=10)
        a = up.read_answer()
        assert a.status == 408, a
        assert a.headers["content-type"] == PROBLEM and a.headers["connection"] == "close"
        assert a.body["code"] == "upload_too_slow" and a.body["reason"] == "rate"
        assert "DARE_UPLOAD_MIN_RATE_BYTES_S=1000" in a.body["detail"]
        assert "Fix:" in a.body["detail"]
        # cut at the end of the first window (the grace), not later
        assert took < window + 1.0, took
        _assert_released(app, s)
        up.close()


def test_a_body_past_its_deadline_is_cut_with_408_however_fast_it_trickles(settings):
    s = settings.model_copy(update={"upload_min_rate_bytes_s": 0, "upload_deadline_s": 1.5})
    with _live(s) as (port, key, app):
        up = RawUpload(port, key, content_length=200 * 1024)
        assert up.send(part_header("history", "history.zip"))
        took = _trickle_until_answered(up, 0.05, b"\0" * 1024, limit_s=10)
        a = up.read_answer()
        assert a.status == 408 and a.body["reason"] == "deadline", a
        assert "DARE_UPLOAD_DEADLINE_S=1.5" in a.body["detail"]
        assert 1.4 < took < 3.0, took
        _assert_released(app, s)
        up.close()


def test_a_client_that_sends_nothing_at_all_is_cut_too(settings):
    """No byte of the body ever comes: the timer, not the next piece, ends the wait."""
    s = settings.model_copy(update={"upload_rate_window_s": 0.5})
    with _live(s) as (port, key, app):
        up = RawUpload(port, key)
        t0 = time.monotonic()
        a = up.read_answer(timeout=10)
        assert a.status == 408 and time.monotonic() - t0 < 2
        _assert_released(app, s)
        up.close()


def _epilogue_body(subject_bytes, junk: int):  # noqa: ANN001
    """A complete form, then junk after the closing boundary (which the parser skips): only a
    cap on the whole body stops it."""
    for name, filename in (("model", "model.onnx"), ("history", "history.zip")):
        yield part_header(name, filename) + subject_bytes[name] + b"\r\n"
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"dataset\"\r\n\r\ndigits\r\n"
           f"--{BOUNDARY}--\r\n").encode()
    for _ in range(junk // 65536):
        yield b"j" * 65536


def test_a_chunked_body_is_capped_as_a_whole(client, settings, subject_bytes):
    total = 3 * settings.max_upload_bytes + 2 * settings.max_config_bytes + 64 * 1024
    r = client.post("/v1/jobs", content=_epilogue_body(subject_bytes, 2 * total),
                    headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert r.json()["field"] == "request body" and r.json()["limit"] == total
    assert list(settings.upload_tmp_dir.iterdir()) == []
    # the same form without the junk is fine: the cap is what refused it
    r = client.post("/v1/jobs", content=_epilogue_body(subject_bytes, 0),
                    headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 202, r.text


def _history_of(size: int) -> bytes:
    payload = (hashlib.sha256(b"x").digest() * (size // 32 + 1))[:size - 200]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("epoch_1.safetensors", payload)
    return buf.getvalue()


def _chunked_form(subject_bytes, history: bytes, piece: int = 16 * 1024):  # noqa: ANN001
    yield part_header("model", "model.onnx") + subject_bytes["model"] + b"\r\n"
    yield part_header("history", "history.zip")
    for i in range(0, len(history), piece):
        yield history[i:i + piece]
    yield (f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"dataset\"\r\n\r\n"
           f"digits\r\n--{BOUNDARY}--\r\n").encode()


def test_the_file_limit_adds_up_over_parser_chunks(client, settings, subject_bytes):
    """The limit (200 KiB) is above one parser chunk (64 KiB): a check of each chunk alone would
    let a 210 KiB file through; the running total refuses it and accepts 190 KiB."""
    s = settings.model_copy(update={"upload_chunk_bytes": 64 * 1024,
                                    "max_upload_bytes": 200 * 1024})
    client.app.state.ctx.settings = s
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    small, big = _history_of(190 * 1024), _history_of(210 * 1024)
    assert len(small) < s.max_upload_bytes < len(big)
    r = client.post("/v1/jobs", content=_chunked_form(subject_bytes, big), headers=headers)
    assert r.status_code == 413, r.text
    assert r.json()["field"] == "history" and r.json()["limit"] == 200 * 1024
    r = client.post("/v1/jobs", content=_chunked_form(subject_bytes, small), headers=headers)
    assert r.status_code == 202, r.text
    assert {i["field"]: i["size"] for i in r.json()["inputs"]}["history"] == len(small)


@pytest.mark.parametrize("chunked", [False, True])
def test_staging_has_a_disk_budget(client, settings, subject_bytes, chunked):
    s = settings.model_copy(update={"staging_max_bytes": 100 * 1024,
                                    "upload_chunk_bytes": 16 * 1024})
    client.app.state.ctx.settings = s
    big = _history_of(150 * 1024)
    if chunked:
        r = client.post("/v1/jobs", content=_chunked_form(subject_bytes, big),
                        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    else:
        files, data = submit_files(subject_bytes)
        files["history"] = ("history.zip", big, "application/zip")
        r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == PROBLEM and int(r.headers["retry-after"]) > 0
    body = r.json()
    assert body["code"] == "staging_full" and "DARE_STAGING_MAX_BYTES" in body["detail"]
    assert client.app.state.admission.staged == 0
    assert list(s.upload_tmp_dir.iterdir()) == []
    files, data = submit_files(subject_bytes)  # small enough: the budget was given back
    assert client.post("/v1/jobs", files=files, data=data).status_code == 202
    assert client.app.state.admission.staged == 0
