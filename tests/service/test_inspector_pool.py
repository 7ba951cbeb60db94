"""The submit-time inspector (issue 9, items 2 and 3): a sandbox, fast, and it cannot starve reads.

The real fork server (``worker.engine.inspect_server``) runs here; only the function its
children call is replaced by a probe (tests/service/inspector_probes.py) that reports from
inside the sandbox what a payload could do there. One server per module (it imports torch).
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.api.inspector_pool import Inspector
from service.settings import Settings
from worker.engine.errors import InputError

from . import hostile_corpus as corpus
from .conftest import RecordingDispatcher, make_key

PROBES = "tests.service.inspector_probes"


def _namespaces_allowed() -> bool:
    """Whether this host lets a process make a network namespace at all (else: skip, the
    sandbox falls back and says so)."""
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        flags = 0x40000000 | (0 if os.geteuid() == 0 else 0x10000000)  # NEWNET (| NEWUSER)
        os._exit(0 if libc.unshare(flags) == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0


needs_netns = pytest.mark.skipif(not _namespaces_allowed(),
                                 reason="this host allows no network namespace")


def _staging(uploads: Path, name: str) -> Path:
    """A staging folder as the API leaves it for the inspector: ``inputs/`` of a valid subject."""
    job = uploads / name
    (job / "inputs").mkdir(parents=True)
    for field, (fname, data) in corpus.valid_files().items():
        (job / "inputs" / f"{field}{Path(fname).suffix}").write_bytes(data)
    return job


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inspector") / "home"


def _settings(home: Path, **kw) -> Settings:
    return Settings(home=home, upload_tmp_dir=home.parent / "uploads",
                    submit_inspection="subprocess", **kw)


@pytest.fixture(scope="module")
def probe_inspector(home):
    """One fork server whose children run ``inspector_probes.<name>``: the name is chosen per
    request through the config (see _Dispatch)."""
    inspector = Inspector(_settings(home, inspection_timeout_s=30), target=f"{PROBES}:dispatch")
    inspector.start()
    yield inspector
    inspector.stop()


def _run(inspector: Inspector, staging: Path, probe: str, **cfg) -> dict:
    return asyncio.run(inspector.inspect(staging, json.dumps({"probe": probe, **cfg})))


@needs_netns
def test_the_child_cannot_open_a_socket(probe_inspector, home):
    """A listening TCP server on the host's loopback, reachable from the test itself, gets no
    connection from the sandboxed child: its connect fails."""
    accepted = []
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()  # the control
        deadline = time.monotonic() + 3
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 1, "the test's own server is not reachable: no control"
        got = _run(probe_inspector, _staging(home.parent / "uploads", "net"), "connect", port=port)
        assert got["connected"] is False, got
        assert "unreachable" in got["error"].lower(), got
        time.sleep(0.2)
        assert len(accepted) == 1, "the sandboxed child reached the host's loopback"
    finally:
        server.close()


@needs_netns
def test_the_child_sees_only_its_job_folder_and_runs_as_nobody(probe_inspector, home):
    uploads = probe_inspector.settings.upload_tmp_dir
    staging = _staging(uploads, "look")
    other = uploads / "job-2" / "inputs" / "model.onnx"  # another tenant's upload
    other.parent.mkdir(parents=True)
    other.write_bytes(b"theirs")
    db = probe_inspector.settings.home / "dare.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_text("the service's database")
    outside = Path("/tmp") / f"dare-test-secret-{os.getpid()}"
    outside.write_text("secret")
    os.environ["DARE_TEST_SECRET"] = "must not reach the inspector"
    try:
        got = _run(probe_inspector, staging, "look",
                   paths=[str(other), str(db), str(outside), str(Path.home())])
    finally:
        outside.unlink()
        del os.environ["DARE_TEST_SECRET"]
    assert got["cwd"] == got["workdir"] == "/tmp/job", got
    assert got["inputs"] == ["data.npz", "history.zip", "model.onnx"], got
    assert got["visible"][str(db)] is False, got
    assert got["visible"][str(outside)] is False, got
    assert got["visible"][str(other)] is False, got
    assert got["wrote"] is False, got
    assert got["secrets_in_env"] == [], got
    assert got["rlimit_as"] == probe_inspector.settings.inspection_memory_bytes
    assert got["rlimit_core"] == 0
    if os.geteuid() == 0:
        assert got["uid"] == 65534, got


def test_each_inspection_is_a_fresh_child(probe_inspector, home):
    """Nothing one tenant's inspection leaves in memory reaches the next one."""
    staging = _staging(home.parent / "uploads", "fresh")
    first = _run(probe_inspector, staging, "look", paths=[])
    second = _run(probe_inspector, staging, "look", paths=[])
    assert first["earlier_children"] == second["earlier_children"] == 0
    assert first["pid"] != second["pid"]


def test_an_inspection_past_its_timeout_is_a_422_and_its_child_is_killed(home):
    inspector = Inspector(_settings(home, inspection_timeout_s=0.5), target=f"{PROBES}:slow")
    inspector.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(InputError) as e:
            asyncio.run(inspector.inspect(_staging(home.parent / "uploads", "slow"), "{}"))
        assert e.value.code == "input_unreadable" and "0.5 s" in e.value.message
        # The first call also waited for the server's torch import; the child itself was cut.
        assert inspector.server is not None and inspector.server.ready.is_set()
        t0 = time.monotonic()
        with pytest.raises(InputError):
            asyncio.run(inspector.inspect(_staging(home.parent / "uploads", "slow2"), "{}"))
        assert time.monotonic() - t0 < 3, "the 4 s stand-in was not killed at 0.5 s"
    finally:
        inspector.stop()


def test_the_real_inspection_is_fast_and_accepts_a_valid_subject(home):
    """The real inspect() through the fork server: ~0.3 s once the server is up."""
    inspector = Inspector(_settings(home))
    inspector.start()
    try:
        staging = _staging(home.parent / "uploads", "real")
        got = asyncio.run(inspector.inspect(staging, "{}"))
        assert got["ok"] is True and got["format"] == "onnx", got
        t0 = time.monotonic()
        asyncio.run(inspector.inspect(staging, "{}"))
        assert time.monotonic() - t0 < 5
    finally:
        inspector.stop()
    assert inspector.server is not None and inspector.server.proc is None


def test_with_inspection_off_nothing_starts(settings):
    from service.api.app import create_app

    assert settings.submit_inspection == "off"
    assert create_app(settings, dispatcher=RecordingDispatcher()).state.inspector is None


def test_waiting_for_an_inspector_holds_no_thread_and_ends_in_a_503(settings):
    """45 submissions against 2 busy inspectors (a 4 s stand-in): more than the 40 threads of
    the pool that serves the sync routes. GET /v1/jobs stays fast meanwhile; the two that got a
    slot are accepted; the rest get 503 inspector_busy with Retry-After after the 2 s wait."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    s = settings.model_copy(update={"submit_inspection": "subprocess",
                                    "inspection_max_concurrent": 2,
                                    "inspection_queue_timeout_s": 2.0,
                                    # all 45 from one tenant reach the inspector's queue
                                    "max_inflight_submissions_per_tenant": 100})
    app = create_app(s, dispatcher=RecordingDispatcher())
    app.state.inspector = Inspector(s, target=f"{PROBES}:slow")
    files = corpus.valid_files()
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, 't1')}"
        server = app.state.inspector.server
        assert server.ready.wait(300), "the fork server never became ready"

        def post():  # noqa: ANN202
            return client.post("/v1/jobs", files={
                k: (f, d, "application/octet-stream") for k, (f, d) in files.items()})

        with ThreadPoolExecutor(45) as pool:
            futures = [pool.submit(post) for _ in range(45)]
            time.sleep(0.5)
            reads = []
            for _ in range(5):
                t0 = time.monotonic()
                r = client.get("/v1/jobs")
                reads.append(time.monotonic() - t0)
                assert r.status_code == 200
                time.sleep(0.1)
            answers = [f.result() for f in futures]
        proc = server.proc
    assert max(reads) < 1.0, f"GET /v1/jobs took {max(reads):.2f} s while submissions waited"
    codes = sorted(r.status_code for r in answers)
    assert codes.count(202) == 2 and codes.count(503) == 43, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["content-type"] == "application/problem+json"
    assert busy.json()["code"] == "inspector_busy" and "Retry-After" in busy.json()["detail"]
    assert int(busy.headers["Retry-After"]) > 0
    assert server.proc is None and proc.poll() is not None  # stopped with the app
    app.state.ctx.engine.dispose()


class CountingInspector:
    """Stands in for the pool: counts inspections, accepts everything."""

    def __init__(self) -> None:
        self.calls = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def inspect(self, staging: Path, config_json: str) -> dict:
        self.calls += 1
        return {"ok": True}


def test_an_idempotency_replay_is_not_inspected_again(settings, subject_bytes):
    """The replay stores nothing, so it costs no inspection (and no inspector slot); a new
    submission is inspected."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    from .conftest import submit_files

    s = settings.model_copy(update={"submit_inspection": "subprocess"})
    app = create_app(s, dispatcher=RecordingDispatcher())
    app.state.inspector = counting = CountingInspector()
    files, data = submit_files(subject_bytes)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, 't1')}"
        first = client.post("/v1/jobs", files=files, data=data, headers={"Idempotency-Key": "k-1"})
        again = client.post("/v1/jobs", files=files, data=data, headers={"Idempotency-Key": "k-1"})
        other = client.post("/v1/jobs", files=files, data=data, headers={"Idempotency-Key": "k-2"})
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 202)
    assert again.json()["id"] == first.json()["id"]
    assert counting.calls == 2  # the first and the new one, not the replay
    app.state.ctx.engine.dispose()
