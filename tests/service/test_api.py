"""The REST contract (DESIGN.md) against a real PostgreSQL database."""
from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta

import pytest

from service.jobs import records as jobs
from service.states import JobStatus, utcnow
from service.store.storage import LocalArtifactStore

from .conftest import run_all_stages, submit_files, tenant_id

CONTRACT_KEYS = {"id", "status", "stage", "progress", "created_at", "started_at", "finished_at",
                 "error", "result", "urls"}
PROBLEM = "application/problem+json"


def _post(client, subject_bytes, **kw):
    files, data = submit_files(subject_bytes, **kw)
    return client.post("/v1/jobs", files=files, data=data)




def test_submit_returns_202_job_object_and_location(client, dispatcher, subject_bytes, settings):
    r = _post(client, subject_bytes, config='{"q": 0.9, "evaluation": {"n_samples": 50}}')
    assert r.status_code == 202, r.text
    job = r.json()
    assert CONTRACT_KEYS <= set(job)
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["stage"] == {"name": "validate", "index": 0, "total": 6, "progress": 0.0}
    assert job["progress"] == 0.0 and job["error"] is None and job["result"] is None
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["created_at"].endswith("Z") or job["created_at"].endswith("+00:00")
    assert job["config"]["q"] == 0.9 and job["config"]["dataset"] == "digits"
    assert job["config"]["evaluation"]["n_samples"] == 50
    assert set(job["urls"]) >= {"self", "events", "cancel", "artifacts"}
    # recorded as received
    got = {i["field"]: i for i in job["inputs"]}
    for field in ("model", "history"):
        assert got[field]["size"] == len(subject_bytes[field])
        assert got[field]["sha256"] == hashlib.sha256(subject_bytes[field]).hexdigest()
    # the message went out (after the commit), carrying the id only
    assert dispatcher.sent == [(job["id"], "validate")]
    # the files are in the store under the engine's names; staging is empty again
    store_dir = settings.artifact_root / "jobs" / job["id"] / "inputs"
    assert (store_dir / "model.onnx").read_bytes() == subject_bytes["model"]
    assert (store_dir / "history.zip").read_bytes() == subject_bytes["history"]
    assert list(settings.upload_tmp_dir.iterdir()) == []
    assert client.get(job["urls"]["self"]).json()["id"] == job["id"]


def test_submit_with_npz_and_compare_runs_seven_stages(client, subject_bytes):
    r = _post(client, subject_bytes, dataset=None, with_data=True, config='{"compare": true}')
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["stage"]["total"] == 7
    assert {i["field"] for i in job["inputs"]} == {"model", "history", "data"}


def test_unknown_job_is_404_problem(client):
    for jid in (str(uuid.uuid4()), "not-a-uuid"):
        for path in ("", "/events", "/artifacts", "/artifacts/report.json"):
            r = client.get(f"/v1/jobs/{jid}{path}")
            assert r.status_code == 404, (path, r.text)
            assert r.headers["content-type"] == PROBLEM
            assert r.json()["code"] == "job_not_found"
        assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 404


def test_unknown_route_is_problem(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "not_found"


def _seed_jobs(client, n: int) -> list[str]:
    """n jobs straight into the database, one second apart, some with equal timestamps."""
    ctx = client.app.state.ctx
    base = utcnow()
    ids = []
    t1 = tenant_id(ctx.factory, "t1")  # the client fixture's tenant
    with ctx.factory.begin() as s:
        for k in range(n):
            jid = uuid.uuid4()
            job = jobs.create_job(s, job_id=jid, tenant_id=t1, config={}, stages=["validate"],
                                  model_format="onnx", inputs=[])
            job.created_at = base - timedelta(seconds=k // 2)  # pairs share a timestamp
            if k % 3 == 0:
                job.status = JobStatus.failed
            ids.append(str(jid))
    return ids


def test_list_is_cursor_paginated_newest_first(client):
    ids = _seed_jobs(client, 7)
    seen, cursor, pages = [], None, 0
    while True:
        r = client.get("/v1/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 7
    created = [client.get(f"/v1/jobs/{i}").json()["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)


def test_list_filters_by_status(client):
    ids = _seed_jobs(client, 6)
    failed = {ids[k] for k in range(6) if k % 3 == 0}
    r = client.get("/v1/jobs", params={"status": "failed"})
    assert {j["id"] for j in r.json()["items"]} == failed
    r = client.get("/v1/jobs", params=[("status", "failed"), ("status", "queued")])
    assert len(r.json()["items"]) == 6
    r = client.get("/v1/jobs", params={"status": "exploded"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"


def test_list_rejects_a_forged_cursor_and_bad_limit(client):
    r = client.get("/v1/jobs", params={"cursor": "definitely-not-ours"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_cursor"
    r = client.get("/v1/jobs", params={"limit": 0})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM


def test_cancel_queued_job_is_immediate_and_idempotent(client, subject_bytes):
    job = _post(client, subject_bytes).json()
    r = client.post(job["urls"]["cancel"])
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    again = client.post(job["urls"]["cancel"])
    assert again.status_code == 202 and again.json()["status"] == "cancelled"
    kinds = [e["kind"] for e in client.get(job["urls"]["events"]).json()["items"]]
    assert kinds == ["created", "cancel_requested", "cancelled"]
    # a message already in the queue finds the job cancelled and does nothing
    run_all_stages(client, job["id"])
    assert client.get(job["urls"]["self"]).json()["status"] == "cancelled"


def test_cancel_running_job_becomes_cancelling(client, subject_bytes):
    job = _post(client, subject_bytes).json()
    ctx = client.app.state.ctx
    with ctx.factory.begin() as s:
        from service.states import transition

        transition(jobs.get_job(s, uuid.UUID(job["id"])), JobStatus.running)
    r = client.post(job["urls"]["cancel"])
    assert r.json()["status"] == "cancelling" and r.json()["finished_at"] is None


def test_cancel_finished_job_is_409(client, subject_bytes):
    job = _post(client, subject_bytes).json()
    run_all_stages(client, job["id"])
    assert client.get(job["urls"]["self"]).json()["status"] == "succeeded"
    r = client.post(job["urls"]["cancel"])
    assert r.status_code == 409 and r.json()["code"] == "job_finished"


def test_succeeded_job_lists_and_serves_every_artifact(client, subject_bytes):
    job = _post(client, subject_bytes).json()
    run_all_stages(client, job["id"])
    job = client.get(job["urls"]["self"]).json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["stage"] == {"name": "evaluate", "index": 5, "total": 6, "progress": 1.0}
    assert job["result"]["attacks"]["fgsm"]["transfer_er"] == 0.5
    assert job["result"]["clean_accuracy"]["within_budget"] is True
    assert set(job["result"]["stage_durations_s"]) == {"validate", "slice", "mine", "tune",
                                                       "export", "evaluate"}
    arts = client.get(job["urls"]["artifacts"]).json()
    names = {a["name"] for a in arts}
    assert {"hardened.onnx", "hardened.safetensors", "report.json", "report.html"} <= names
    for a in arts:
        assert set(a) >= {"name", "size", "sha256"}
        r = client.get(a["url"])
        assert r.status_code == 200
        assert len(r.content) == a["size"]
        assert hashlib.sha256(r.content).hexdigest() == a["sha256"]
        assert r.headers["etag"] == f'"{a["sha256"]}"'
    assert client.get(job["urls"]["report_json"]).json()["schema_version"] == 1
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/hardened.pt2")
    assert r.status_code == 404 and r.json()["code"] == "artifact_not_found"
    assert "report.json" in r.json()["detail"]
    # the database holds URIs into the store, not bytes
    with client.app.state.ctx.factory() as s:
        for a in jobs.list_artifacts(s, uuid.UUID(job["id"])):
            assert a.uri.startswith("file://")
            assert LocalArtifactStore(client.app.state.ctx.settings.artifact_root).exists(a.uri)


def test_events_can_be_polled_incrementally(client, subject_bytes):
    job = _post(client, subject_bytes).json()
    run_all_stages(client, job["id"])
    first = client.get(job["urls"]["events"], params={"limit": 2}).json()
    assert [e["kind"] for e in first["items"]] == ["created", "stage_started"]
    rest = client.get(job["urls"]["events"], params={"after": first["next_after"]}).json()
    kinds = [e["kind"] for e in rest["items"] if e["kind"] != "progress"]
    assert kinds[-1] == "succeeded"
    assert kinds.count("stage_started") == 5 and kinds.count("stage_finished") == 6
    ids = [e["id"] for e in first["items"] + rest["items"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    empty = client.get(job["urls"]["events"], params={"after": rest["next_after"]}).json()
    assert empty == {"items": [], "next_after": rest["next_after"]}


def test_broker_down_answers_503_and_records_the_failure(client, dispatcher, subject_bytes):
    dispatcher.fail = True
    r = _post(client, subject_bytes)
    assert r.status_code == 503 and r.json()["code"] == "broker_unavailable"
    assert r.headers["content-type"] == PROBLEM
    items = client.get("/v1/jobs").json()["items"]
    assert len(items) == 1 and items[0]["status"] == "failed"
    assert items[0]["error"]["code"] == "broker_unavailable"


def test_unexpected_error_is_a_problem_without_traceback(client, subject_bytes, monkeypatch):
    import service.api.routes.jobs as routes

    def boom(*a, **k):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(routes, "submit", boom)
    r = _post(client, subject_bytes)
    assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "internal_error"
    assert "Traceback" not in r.text and "secret" not in r.text


def test_healthz_and_openapi_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(body["schema"]["properties"]) == {"model", "history", "data", "dataset", "config"}
    assert "example" in body["schema"]["properties"]["config"]
    assert "example" in spec["components"]["schemas"]["JobRead"]
    assert "application/problem+json" in \
        spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["404"]["content"]


@pytest.mark.parametrize("broker,ok", [("redis://127.0.0.1:6379/5", True),
                                       ("redis://127.0.0.1:1/0", False)])
def test_readyz_checks_database_and_real_broker(settings, broker, ok):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    s = settings.model_copy(update={"broker_url": broker})
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
    if ok:
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
    else:
        assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "not_ready"
        assert r.json()["checks"]["database"] == "ok" and r.json()["checks"]["broker"] != "ok"


def test_api_process_stays_free_of_torch(tmp_path):
    """Importing torch would cost the API ~7 s and ~600 MB; the API needs none of it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.api.app import create_app\n"
        "from service.settings import Settings\n"
        "from service.api.submission import validate_form, embedded_datasets\n"
        f"s = Settings(home={str(tmp_path)!r})\n"
        "app = create_app(s, check_db_schema=False)\n"
        "assert embedded_datasets() == ('digits', 'mnist5k', 'fashion'), embedded_datasets()\n"
        "import worker.engine.pt2_layout  # the API's .pt2 layout check\n"
        "from worker.engine.config import stage_names\n"
        "from worker.engine.config import parse_config\n"
        "print(stage_names(parse_config({})))\n"
        "assert 'torch' not in sys.modules, 'the API imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
