"""Bad submissions: each is a problem+json with a stable code, leaves no job and no files."""
from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from .conftest import submit_files
from .subjects import data_npz

PROBLEM = "application/problem+json"


def _assert_problem(r, status: int, code: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == code, body
    assert body["status"] == status and body["type"].endswith(code) and body["title"]
    for w in words:
        assert w in body["detail"], body["detail"]
    assert "Traceback" not in r.text
    return body


def _no_trace(client, settings) -> None:
    assert client.get("/v1/jobs").json()["items"] == []
    assert list(settings.upload_tmp_dir.iterdir()) == []
    assert not (settings.artifact_root / "jobs").exists() or \
        list((settings.artifact_root / "jobs").iterdir()) == []


@pytest.mark.parametrize("config,words", [
    ('{"q": "high"}', ["'q'"]),                       # wrong type
    ('{"q": 1.5}', ["'q'"]),                          # out of range
    ('{"hisotry_fraction": 0.5}', ["hisotry_fraction"]),  # typo: unknown keys are refused
    ('{"evaluation": {"attacks": ["fgsm", "laser"]}}', ["evaluation.attacks"]),
    ("{not json", ["not valid JSON"]),
    ('[1, 2]', ["JSON object"]),
])
def test_bad_config_is_422_naming_the_field(client, settings, subject_bytes, config, words):
    files, data = submit_files(subject_bytes, config=config)
    body = _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "invalid_config",
                           *words)
    assert "Fix:" in body["detail"]
    _no_trace(client, settings)


@pytest.mark.parametrize("drop,code,words", [
    ("model", "missing_field", ["'model'"]),
    ("history", "missing_field", ["'history'"]),
    ("dataset", "missing_field", ["data", "dataset"]),
])
def test_missing_parts_are_422(client, settings, subject_bytes, drop, code, words):
    files, data = submit_files(subject_bytes)
    files.pop(drop, None)
    data.pop(drop, None)
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, code, *words)
    _no_trace(client, settings)


def test_wrong_extension_is_422(client, settings, subject_bytes):
    files, data = submit_files(subject_bytes)
    files["model"] = ("model.h5", subject_bytes["model"], "application/octet-stream")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "unsupported_file_type",
                    ".onnx", ".pt2", "model.h5")
    files, data = submit_files(subject_bytes)
    files["history"] = ("history.tar", subject_bytes["history"], "application/x-tar")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "unsupported_file_type",
                    ".zip")
    _no_trace(client, settings)


def test_unknown_dataset_is_422_listing_the_known_ones(client, settings, subject_bytes):
    files, data = submit_files(subject_bytes, dataset="cifar10")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "unknown_dataset",
                    "cifar10", "digits", "mnist5k")
    _no_trace(client, settings)


def test_data_and_dataset_together_is_422(client, settings, subject_bytes):
    files, data = submit_files(subject_bytes, with_data=True)
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "conflicting_data")
    files, data = submit_files(subject_bytes, config='{"dataset": "mnist5k"}')
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "conflicting_dataset")


def test_contents_are_checked_cheaply(client, settings, subject_bytes):
    files, data = submit_files(subject_bytes)
    files["model"] = ("model.onnx", b"\x00\x01 this is not protobuf \xff" * 10, "application/x")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "invalid_model")

    files, data = submit_files(subject_bytes)
    files["model"] = ("model.pt2", b"not a zip", "application/zip")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "invalid_model", ".pt2")

    files, data = submit_files(subject_bytes)
    files["history"] = ("history.zip", b"PK but not really", "application/zip")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "invalid_history")

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "no checkpoints here")
    files, data = submit_files(subject_bytes)
    files["history"] = ("history.zip", buf.getvalue(), "application/zip")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "invalid_history",
                    "no checkpoint")

    files, data = submit_files(subject_bytes, dataset=None)
    files["data"] = ("data.npz", data_npz(keys=("x_train", "y_train", "x_test")), "application/x")
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "invalid_data",
                    "x_val", "y_val", "y_test")
    _no_trace(client, settings)


def test_unknown_and_duplicate_fields_are_422(client, settings, subject_bytes):
    files, data = submit_files(subject_bytes)
    data["modle"] = "x"
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "unknown_field", "modle")
    files, data = submit_files(subject_bytes)
    files = list(files.items()) + [("model", ("again.onnx", subject_bytes["model"], "x/y"))]
    _assert_problem(client.post("/v1/jobs", files=files, data=data), 422, "duplicate_field")
    _no_trace(client, settings)


def test_not_multipart_is_415(client):
    r = client.post("/v1/jobs", json={"model": "x"})
    _assert_problem(r, 415, "unsupported_media_type", "multipart/form-data")


def test_oversize_upload_with_content_length_is_413(client, settings, subject_bytes):
    big = b"\0" * (settings.max_upload_bytes + 1)
    files, data = submit_files(subject_bytes)
    files["history"] = ("history.zip", big, "application/zip")
    body = _assert_problem(client.post("/v1/jobs", files=files, data=data), 413,
                           "upload_too_large", "history", str(settings.max_upload_bytes))
    assert body["field"] == "history" and body["limit"] == settings.max_upload_bytes
    _no_trace(client, settings)


def _multipart_stream(boundary: str, parts: list[tuple[str, str, bytes]], pad_field: str,
                      pad_bytes: int):
    """A chunked multipart body (no Content-Length): pad_field's content arrives in 64 KiB
    pieces, so only a limit enforced while streaming can stop it."""
    for name, filename, content in parts:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
               f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        yield content + b"\r\n"
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{pad_field}\"; "
           f"filename=\"big.zip\"\r\n\r\n").encode()
    sent = 0
    while sent < pad_bytes:
        yield b"\0" * 65536
        sent += 65536
    yield f"\r\n--{boundary}--\r\n".encode()


def test_oversize_upload_without_content_length_is_cut_off_at_the_limit(client, settings,
                                                                          subject_bytes):
    boundary = "dareboundary1234"
    body = _multipart_stream(boundary, [("model", "model.onnx", subject_bytes["model"])],
                             "history", 4 * settings.max_upload_bytes)
    r = client.post("/v1/jobs", content=body,
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in r.request.headers
    _assert_problem(r, 413, "upload_too_large", "history")
    _no_trace(client, settings)


def test_streamed_upload_records_size_and_sha256(client, settings, subject_bytes):
    """A chunked body larger than one parser chunk (1 MiB) arrives intact."""
    s = settings.model_copy(update={"max_upload_bytes": 8 * 1024 * 1024,
                                    "upload_chunk_bytes": 256 * 1024})
    client.app.state.ctx.settings = s
    payload = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB, not all zeros
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("epoch_1.safetensors", payload)
    history = buf.getvalue()
    files, data = submit_files(subject_bytes)
    files["history"] = ("history.zip", history, "application/zip")
    r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 202, r.text
    got = {i["field"]: i for i in r.json()["inputs"]}["history"]
    assert got["size"] == len(history)
    assert got["sha256"] == hashlib.sha256(history).hexdigest()
    stored = s.artifact_root / "jobs" / r.json()["id"] / "inputs" / "history.zip"
    assert stored.read_bytes() == history
