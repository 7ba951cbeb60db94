"""GET /v1/jobs/{id}/report: the report.html artifact, inline, under a no-network CSP."""
from __future__ import annotations

import uuid

from . import fake_engine
from .conftest import run_all_stages, submit_files

PROBLEM = "application/problem+json"


def _post(client, subject_bytes, **kw) -> dict:
    files, data = submit_files(subject_bytes, **kw)
    r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 202, r.text
    return r.json()




def test_report_is_served_inline_with_a_no_network_policy(client, subject_bytes):
    job = _post(client, subject_bytes)
    url = f"/v1/jobs/{job['id']}/report"

    r = client.get(url)  # queued: no report yet, and the problem says what the job is doing
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "report_not_ready" and body["job_status"] == "queued"
    assert "queued" in body["detail"] and f"/v1/jobs/{job['id']}" in body["detail"]

    run_all_stages(client, job["id"])
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded" and job["urls"]["report"] == url
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "attachment" not in r.headers.get("content-disposition", "")  # shown, not downloaded
    csp = [d.strip() for d in r.headers["content-security-policy"].split(";")]
    assert {"default-src 'none'", "style-src 'unsafe-inline'", "img-src data:"} <= set(csp)
    assert not any(d.startswith("script-src") for d in csp)  # default-src 'none' covers scripts
    assert r.headers["x-content-type-options"] == "nosniff"
    artifact = client.get(job["urls"]["report_html"])
    assert artifact.status_code == 200
    assert r.content == artifact.content and r.content.startswith(b"<html>")
    assert r.headers["etag"] == artifact.headers["etag"]


def test_failed_job_has_no_report_and_says_why(client, subject_bytes):
    job = _post(client, subject_bytes, config=f'{{"seed": {fake_engine.FAIL_INPUT_SEED}}}')
    run_all_stages(client, job["id"])
    r = client.get(f"/v1/jobs/{job['id']}/report")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "report_not_ready" and body["job_status"] == "failed"
    assert "failed" in body["detail"] and "error" in body["detail"]


def test_report_of_another_tenant_or_unknown_job_is_not_found(client, client_t2, subject_bytes):
    job = _post(client, subject_bytes)
    run_all_stages(client, job["id"])
    assert client.get(f"/v1/jobs/{job['id']}/report").status_code == 200
    for c, jid in ((client_t2, job["id"]), (client, str(uuid.uuid4())), (client, "nope")):
        r = c.get(f"/v1/jobs/{jid}/report")
        assert r.status_code == 404 and r.json()["code"] == "job_not_found", (jid, r.text)
