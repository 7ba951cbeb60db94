"""The per-tenant limit on active (queued, running, cancelling) jobs: 429 with Retry-After past
it, answered before the body is read, nothing stored for a refused submission, per tenant, and
race-safe on PostgreSQL and SQLite. The per-tenant cap on submissions in flight: 429 before the
body, per tenant, given back when an upload ends however it ends (a client that disconnects)."""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.jobs import records as jobs
from service.states import JobStatus, transition

from .conftest import RecordingDispatcher, make_key, submit_files, tenant_id
from .live_server import RawUpload, part_header, serve

PROBLEM = "application/problem+json"


def _post(client, subject_bytes, headers: dict | None = None):
    files, data = submit_files(subject_bytes)
    return client.post("/v1/jobs", files=files, data=data, headers=headers or {})


def _assert_429(r, limit: int) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == PROBLEM
    assert int(r.headers["retry-after"]) > 0
    body = r.json()
    assert body["code"] == "too_many_active_jobs"
    assert body["limit"] == limit and body["active"] == limit
    assert f"at once is {limit}" in body["detail"] and "--max-active-jobs" in body["detail"]


def test_tenant_limit_refuses_past_it_and_frees_a_slot_when_a_job_ends(client, subject_bytes,
                                                                       settings):
    key = make_key(client.app.state.ctx.factory, "q1", max_active_jobs=2)
    auth = {"Authorization": f"Bearer {key}"}
    a = _post(client, subject_bytes, auth).json()
    b = _post(client, subject_bytes, auth).json()
    _assert_429(_post(client, subject_bytes, auth), 2)
    # the refused upload left nothing behind
    assert sorted(p.name for p in (settings.artifact_root / "jobs").iterdir()) == sorted(
        [a["id"], b["id"]])
    assert list(settings.upload_tmp_dir.iterdir()) == []
    assert len(client.get("/v1/jobs", headers=auth).json()["items"]) == 2
    # another tenant (the client fixture's t1, limit 1000 here) is not affected
    assert _post(client, subject_bytes).status_code == 202

    # cancelling frees a slot at once (queued -> cancelled)
    assert client.post(f"/v1/jobs/{a['id']}/cancel", headers=auth).json()["status"] == "cancelled"
    c = _post(client, subject_bytes, auth)
    assert c.status_code == 202, c.text
    _assert_429(_post(client, subject_bytes, auth), 2)
    # running and cancelling count as active; succeeded does not
    ctx = client.app.state.ctx
    with ctx.factory.begin() as s:
        transition(jobs.get_job(s, uuid.UUID(b["id"])), JobStatus.running)
    _assert_429(_post(client, subject_bytes, auth), 2)
    with ctx.factory.begin() as s:
        transition(jobs.get_job(s, uuid.UUID(b["id"])), JobStatus.cancelling)
    _assert_429(_post(client, subject_bytes, auth), 2)
    with ctx.factory.begin() as s:
        transition(jobs.get_job(s, uuid.UUID(b["id"])), JobStatus.cancelled)
    assert _post(client, subject_bytes, auth).status_code == 202


def test_the_setting_applies_to_tenants_without_their_own_limit(settings, dispatcher,
                                                                subject_bytes):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(settings.model_copy(update={"max_active_jobs_per_tenant": 1}),
                     dispatcher=dispatcher)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, 'q2')}"
        assert _post(c, subject_bytes).status_code == 202
        _assert_429(_post(c, subject_bytes), 1)
    app.state.ctx.engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def racing_client(request, settings, tmp_path):
    """A client whose tenant may have 2 active jobs, on each database backend."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.store.db import upgrade

    s = settings
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'race.db'}"
        upgrade(url)
        s = settings.model_copy(update={"database_url": url})
    # all six in flight at once, so that the lock (not the in-flight cap) settles the race
    s = s.model_copy(update={"max_inflight_submissions_per_tenant": 10})
    dispatcher = RecordingDispatcher()
    app = create_app(s, dispatcher=dispatcher)
    with TestClient(app, raise_server_exceptions=False) as c:
        key = make_key(app.state.ctx.factory, "racer", max_active_jobs=2)
        c.headers["Authorization"] = f"Bearer {key}"
        yield c, dispatcher
    app.state.ctx.engine.dispose()


def test_concurrent_submissions_cannot_overshoot_the_limit(racing_client, subject_bytes):
    client, dispatcher = racing_client
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _post(client, subject_bytes), range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202, 202, 429, 429, 429, 429], [r.text[:200] for r in answers]
    assert len(client.get("/v1/jobs").json()["items"]) == 2
    assert len(dispatcher.sent) == 2


def test_an_idempotent_retry_at_the_quota_gets_its_job_back(client, subject_bytes):
    """The early quota check must not turn a retry of an accepted submission (which itself
    fills the quota) into a 429."""
    key = make_key(client.app.state.ctx.factory, "q3", max_active_jobs=1)
    auth = {"Authorization": f"Bearer {key}", "Idempotency-Key": "retry-me"}
    first = _post(client, subject_bytes, auth)
    assert first.status_code == 202, first.text
    again = _post(client, subject_bytes, auth)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text
    _assert_429(_post(client, subject_bytes, {"Authorization": f"Bearer {key}"}), 1)


@pytest.fixture
def live(settings):
    """A real server (uvicorn) on the settings, with tenants "a" (limit 1 active job) and "b"."""
    from service.api.app import create_app

    app = create_app(settings, dispatcher=RecordingDispatcher())
    factory = app.state.ctx.factory
    keys = {"a": make_key(factory, "a", max_active_jobs=1), "b": make_key(factory, "b")}
    try:
        with serve(app) as port:
            yield port, keys, app
    finally:
        app.state.ctx.engine.dispose()


def _submit_over_http(port: int, key: str, subject_bytes) -> int:  # noqa: ANN001
    import httpx

    files, data = submit_files(subject_bytes)
    return httpx.post(f"http://127.0.0.1:{port}/v1/jobs", files=files, data=data, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}).status_code


def test_a_tenant_at_its_quota_is_refused_before_sending_its_body(live, settings,
                                                                   subject_bytes):
    port, keys, app = live
    assert _submit_over_http(port, keys["a"], subject_bytes) == 202
    # headers and the first bytes of a 100 KiB body: the answer comes without the rest
    up = RawUpload(port, keys["a"], content_length=100 * 1024)
    assert up.send(part_header("model", "model.onnx") + b"\x08")
    assert up.answered(5), "no answer while the body was still unsent"
    a = up.read_answer()
    assert a.status == 429 and a.body["code"] == "too_many_active_jobs", a
    assert int(a.headers["retry-after"]) > 0
    up.close()
    assert list(settings.upload_tmp_dir.iterdir()) == []  # nothing was staged for it
    assert app.state.admission.inflight(tenant_id(app.state.ctx.factory, "a")) == 0


def test_submissions_in_flight_are_capped_per_tenant(live, settings, subject_bytes):
    port, keys, app = live
    factory = app.state.ctx.factory
    limit = settings.max_inflight_submissions_per_tenant
    assert limit == 2  # the default
    # tenant b holds its two places with uploads that are still arriving
    slow = [RawUpload(port, keys["b"]) for _ in range(limit)]
    for up in slow:
        assert up.send(part_header("model", "model.onnx") + b"\x08")
    deadline = time.monotonic() + 10
    while app.state.admission.inflight(tenant_id(factory, "b")) < limit:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    third = RawUpload(port, keys["b"], content_length=100 * 1024)
    assert third.answered(5), "no answer while the body was still unsent"
    a = third.read_answer()
    assert a.status == 429 and a.body["code"] == "too_many_submissions_in_flight", a
    assert int(a.headers["retry-after"]) > 0 and a.body["limit"] == limit
    assert "DARE_MAX_INFLIGHT_SUBMISSIONS_PER_TENANT" in a.body["detail"]
    third.close()
    # another tenant is not affected
    assert _submit_over_http(port, keys["a"], subject_bytes) == 202
    # clients that give up mid-body give their places back
    for up in slow:
        up.close()
    while app.state.admission.inflight(tenant_id(factory, "b")) > 0:
        assert time.monotonic() < deadline + 10, "a disconnected upload kept its place"
        time.sleep(0.02)
    assert _submit_over_http(port, keys["b"], subject_bytes) == 202
    assert app.state.admission.staged == 0
    assert list(settings.upload_tmp_dir.iterdir()) == []
