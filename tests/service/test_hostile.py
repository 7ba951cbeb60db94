"""The hostile-input corpus (issue 4, item 4) through the real app with inspection on.

Each case must get its 4xx problem+json naming what was wrong, leave no job row and no file
anywhere under the service's home (no stored input, an empty staging area, no zip-slip target),
never run a payload, and leave the service answering /healthz. A valid subject goes through
too and is accepted, so the refusals cannot come from an inspector that refuses everything.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import text

from service.settings import Settings

from . import hostile_corpus as corpus
from . import hostile_pt2
from .conftest import FAKE_RUNNER, REDIS_URL, RecordingDispatcher, make_key

PROBLEM = "application/problem+json"
MAX_UPLOAD = 1 << 20
MAX_UNCOMPRESSED = 512 << 10  # small, so the total-size cap is reachable with a small upload
_results: dict[str, bool] = {}


@pytest.fixture(scope="module")
def api(pg_url, tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    root = tmp_path_factory.mktemp("hostile")
    settings = Settings(home=root / "home", database_url=pg_url, broker_url=REDIS_URL,
                        max_upload_bytes=MAX_UPLOAD, max_history_uncompressed_bytes=MAX_UNCOMPRESSED,
                        submit_inspection="subprocess", inspection_timeout_s=90,
                        stage_runner=FAKE_RUNNER)
    app = create_app(settings, dispatcher=RecordingDispatcher())
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, 'hostile')}"
        cases = corpus.build(root / "corpus", max_upload_bytes=MAX_UPLOAD,
                             max_uncompressed=MAX_UNCOMPRESSED)
        yield c, settings, cases
    app.state.ctx.engine.dispose()
    done = sum(_results.values())
    print(f"\nhostile inputs refused as expected: {done} of {len(_results)}")


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _job_count(settings: Settings) -> int:
    from service.store.db import engine_for

    with engine_for(settings.database_url).connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()


def _post(client, case: corpus.Case):  # noqa: ANN202
    files = {k: (fname, data, "application/octet-stream") for k, (fname, data) in case.files.items()}
    return client.post("/v1/jobs", files=files, data=case.fields)


def _assert_problem(r, case: corpus.Case) -> None:  # noqa: ANN001 (httpx.Response)
    """The refusal a user sees: the expected status and code, a detail naming what was wrong."""
    assert r.status_code == case.status, f"{case.name}: {r.status_code} {r.text[:500]}"
    assert r.headers["content-type"] == PROBLEM, case.name
    body = r.json()
    assert body["code"] == case.code, f"{case.name}: {body}"
    for w in case.words:
        assert w in body["detail"], f"{case.name}: {w!r} not in {body['detail']!r}"
    assert "Traceback" not in r.text


def _check_refused(client, settings: Settings, case: corpus.Case, send) -> None:  # noqa: ANN001
    before_files, before_jobs = _files_under(settings.home), _job_count(settings)
    _results[case.name] = False
    _assert_problem(send(), case)
    # Nothing stored, nothing left in staging, nothing written anywhere under home.
    assert _job_count(settings) == before_jobs, case.name
    assert _files_under(settings.home) == before_files, case.name
    assert list(settings.upload_tmp_dir.iterdir()) == [], case.name
    for p in (*case.must_not_exist, Path.cwd().parent.parent / "evil.safetensors",
              settings.home.parent / "evil.safetensors", settings.home / "evil.safetensors"):
        assert not p.exists(), f"{case.name} wrote {p}"
    assert client.get("/healthz").status_code == 200
    _results[case.name] = True


def test_payloads_in_the_corpus_are_live(tmp_path):
    """The pickles really run code when loaded unsafely, so 'marker absent' means something."""
    import pickle

    marker = tmp_path / "m"
    pickle.loads(pickle.dumps(corpus._OpensFile(marker))).close()
    assert marker.exists()
    marker.unlink()
    assert pickle.loads(pickle.dumps(corpus._RunsShell(marker))) == 0 and marker.exists()


def test_cheap_refusals(api):
    """Cases the API refuses before the inspector: one round, each checked in turn."""
    client, settings, cases = api
    cheap = [c for c in cases if not c.deep]
    assert len(cheap) >= 10
    for case in cheap:
        _check_refused(client, settings, case, lambda case=case: _post(client, case))


def test_oversize_without_content_length_is_cut_off(api):
    client, settings, _ = api
    boundary = "hostileboundary42"
    model = corpus.model_onnx().SerializeToString()

    def body():  # noqa: ANN202
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; "
               f"filename=\"model.onnx\"\r\n\r\n").encode() + model + b"\r\n"
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"history\"; "
               f"filename=\"history.zip\"\r\n\r\n").encode()
        for _ in range(4 * MAX_UPLOAD // 65536):
            yield bytes(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    case = corpus.Case("upload over the size limit, chunked", {}, status=413,
                       code="upload_too_large", words=("history", str(MAX_UPLOAD)))

    def send():  # noqa: ANN202
        r = client.post("/v1/jobs", content=body(),
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in r.request.headers
        return r

    _check_refused(client, settings, case, send)


def test_deep_refusals_and_a_valid_subject(api):
    """Cases only loading the files reveals. Each costs one inspector process (a torch import,
    ~5 CPU-seconds), so they are sent two at a time; the checks that need a quiet service (no
    new job row, no new file under home) are made once for the whole batch. The valid subject,
    sent last, shows the inspector accepts good input under the default limits (RLIMIT_AS
    8 GiB; torch's CUDA build maps ~3.5 GiB by itself)."""
    from concurrent.futures import ThreadPoolExecutor

    client, settings, cases = api
    deep = [c for c in cases if c.deep]
    assert len(deep) >= 9 + 2 * len(hostile_pt2.VARIANTS)
    before_files, before_jobs = _files_under(settings.home), _job_count(settings)

    def one(case: corpus.Case) -> None:
        _results[case.name] = False
        _assert_problem(_post(client, case), case)
        for p in case.must_not_exist:
            assert not p.exists(), f"{case.name} wrote {p}"
        assert client.get("/healthz").status_code == 200
        _results[case.name] = True

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(one, c) for c in deep]:
            f.result()
    assert _job_count(settings) == before_jobs
    assert _files_under(settings.home) == before_files
    assert list(settings.upload_tmp_dir.iterdir()) == []
    markers = [p for c in cases for p in c.must_not_exist if "pwned" in p.name]
    ran = [p.name for p in markers if p.exists()]
    print(f"\npayloads tried: {len(markers)}, payloads that ran: {len(ran)} {ran}")
    assert len([c for c in deep if c.name.startswith("pt2 ")]) == 2 * len(hostile_pt2.VARIANTS)
    assert ran == []

    assert settings.inspection_memory_bytes == 8 << 30
    for name, files in (("valid subject", corpus.valid_files()),
                        ("valid .pt2 subject", corpus.valid_pt2_files())):
        r = _post(client, corpus.Case(name, files))
        assert r.status_code == 202, f"{name}: {r.text}"
        assert r.json()["status"] == "queued"
    assert _job_count(settings) == before_jobs + 2
    assert list(settings.upload_tmp_dir.iterdir()) == []


def test_an_inspector_that_times_out_is_a_422_not_a_500(api):
    client, settings, _ = api
    old = settings.inspection_timeout_s
    # A forked inspector (torch already imported) takes ~0.3 s on a digits subject; loading the
    # ONNX model alone takes longer than this.
    settings.inspection_timeout_s = 0.02
    try:
        case = corpus.Case("inspector timeout", corpus.valid_files(), code="input_unreadable",
                           words=("time out", "0.02 s"))
        _check_refused(client, settings, case, lambda: _post(client, case))
    finally:
        settings.inspection_timeout_s = old


def test_an_inspector_out_of_memory_is_a_422_not_a_500(api):
    """Under a 1 GiB address-space limit torch cannot even be imported (its CUDA build maps
    ~3.5 GiB): whatever fails in the child, the client gets a 422 and the service stays up."""
    client, settings, _ = api
    # The one-shot path (DARE_INSPECTION_FORK_SERVER=false): a child forked from the fork server
    # has torch mapped already and may parse a small file from the heap it inherited, so only
    # a fresh process fails for certain under the cap.
    inspector = client.app.state.inspector
    old, server = settings.inspection_memory_bytes, inspector.server
    settings.inspection_memory_bytes, inspector.server = 1 << 30, None
    try:
        case = corpus.Case("inspector out of memory", corpus.valid_files(),
                           code="input_unreadable", words=("inputs",))
        _check_refused(client, settings, case, lambda: _post(client, case))
    finally:
        settings.inspection_memory_bytes, inspector.server = old, server


# --- the engine side: the same checks where the API never looked ----------------------------

def _job_dir(tmp_path: Path, files: dict[str, tuple[str, bytes]]) -> Path:
    (tmp_path / "inputs").mkdir(parents=True)
    for field, (fname, data) in files.items():
        (tmp_path / "inputs" / f"{field}{Path(fname).suffix}").write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("where", ["checkpoint", "model"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_engine_refuses_non_finite_weights(tmp_path, where, bad):
    import numpy as np
    from safetensors.numpy import save as st_save

    from worker.engine.inspect_inputs import inspect

    files = corpus.valid_files()
    w = corpus.weights(2)
    w["fc2.bias"][1] = float(bad)
    if where == "model":
        files["model"] = ("model.onnx", corpus.model_onnx(w).SerializeToString())
    else:
        files["history"] = ("history.zip", corpus.history_zip(
            {**corpus.checkpoints(1), "epoch_2.safetensors": st_save(w)}))
    got = inspect(_job_dir(tmp_path, files), "{}")
    assert got["ok"] is False and "fc2.bias" in got["message"], got
    assert got["code"] == ("model_not_finite" if where == "model" else "history_mismatch")
    assert np.isfinite(corpus.weights(2)["fc2.bias"]).all()


def test_engine_reader_caps_the_bytes_actually_read(tmp_path):
    """Declared sizes are checked up front; the reader counts what decompression produces."""
    from worker.engine.archive_safety import ReadBudget
    from worker.engine.errors import InputError

    path = tmp_path / "h.zip"
    path.write_bytes(corpus.history_zip({"a.bin": os.urandom(300_000), "b.bin": os.urandom(300_000)}))
    with zipfile.ZipFile(path) as z:
        budget = ReadBudget("history 'h.zip'", max_total=500_000)
        assert len(budget.read_member(z, z.getinfo("a.bin"))) == 300_000
        with pytest.raises(InputError) as e:
            budget.read_member(z, z.getinfo("b.bin"))
    assert e.value.code == "zip_bomb" and "500000" in e.value.message



def test_an_inspector_that_crashes_is_an_input_error(tmp_path, monkeypatch):
    """A child that dies by a signal (here: a stand-in interpreter that segfaults itself)
    becomes InputError('input_unreadable') naming the signal, which the API answers with 422."""
    import sys

    from service.api.inspection import inspect_inputs
    from worker.engine.errors import InputError

    crasher = tmp_path / "python"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(0o755)
    job = _job_dir(tmp_path / "job", corpus.valid_files())
    monkeypatch.setattr(sys, "executable", str(crasher))
    with pytest.raises(InputError) as e:
        inspect_inputs(job, "{}", Settings(home=tmp_path / "home"))
    assert e.value.code == "input_unreadable" and "SIGSEGV" in e.value.message
