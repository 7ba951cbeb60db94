"""The per-tenant limit on active (queued, running, cancelling) jobs: 429 with Retry-After past
it, nothing stored for a refused submission, per tenant, and race-safe on PostgreSQL and SQLite."""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from service import jobs
from service.states import JobStatus, transition

from .conftest import RecordingDispatcher, make_key, submit_files

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

    from service.app import create_app

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

    from service.app import create_app
    from service.db import upgrade

    s = settings
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'race.db'}"
        upgrade(url)
        s = settings.model_copy(update={"database_url": url})
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
