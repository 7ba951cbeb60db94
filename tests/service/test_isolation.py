"""Tenant isolation, for every /v1 route in the app's route table (so a route added later is
covered without editing this file): another tenant's job id answers 404 job_not_found exactly
like a missing one, changes nothing, and never shows up in a list."""
from __future__ import annotations

import re
import uuid

from .conftest import api_routes, run_all_stages, submit_files

PROBLEM = "application/problem+json"
PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
# How to fill the path parameters other than job_id, so that the owner's request would succeed.
# A new route with another parameter fails the test until it is taught here.
OTHER_PARAMS = {"name": "report.json"}


def _submit(client, subject_bytes) -> str:
    files, data = submit_files(subject_bytes)
    r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 202, r.text
    return r.json()["id"]




def _fill(path: str, job_id: str) -> str:
    def one(m: re.Match) -> str:
        if m[1] == "job_id":
            return job_id
        assert m[1] in OTHER_PARAMS, (
            f"route {path} has a path parameter {{{m[1]}}} this test cannot fill: add it to "
            "OTHER_PARAMS in tests/service/test_isolation.py")
        return OTHER_PARAMS[m[1]]
    return PARAM.sub(one, path)


def _snapshot(client, job_id: str) -> tuple:
    job = client.get(f"/v1/jobs/{job_id}").json()
    events = client.get(f"/v1/jobs/{job_id}/events").json()["items"]
    arts = client.get(f"/v1/jobs/{job_id}/artifacts").json()
    return job["status"], job["finished_at"], len(events), sorted(a["sha256"] for a in arts)


def test_every_job_route_answers_404_to_another_tenant(client, client_t2, subject_bytes, capsys):
    done = _submit(client, subject_bytes)       # t1, succeeded: has artifacts and a report
    run_all_stages(client, done)
    queued = _submit(client, subject_bytes)     # t1, still queued: cancellable
    mine = _submit(client_t2, subject_bytes)    # t2's own job
    before = {j: _snapshot(client, j) for j in (done, queued)}
    assert before[done][0] == "succeeded" and before[queued][0] == "queued"

    job_routes = [(m, p) for m, p in api_routes(client.app) if "{job_id}" in p]
    assert len(job_routes) >= 6, job_routes  # get, events, cancel, artifacts, download, ...
    table = []
    # 1. t2 (and a client with no key at all) against t1's jobs: 404, exactly like a missing id
    for method, path in job_routes:
        for victim in (done, queued):
            nobody = str(uuid.uuid4())
            r = client_t2.request(method, _fill(path, victim))
            missing = client_t2.request(method, _fill(path, nobody))
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.headers["content-type"] == PROBLEM
            assert r.json()["code"] == "job_not_found", (method, path, r.text)
            # byte for byte the answer for an id that does not exist, but for the id itself
            assert r.text.replace(victim, "ID") == missing.text.replace(nobody, "ID")
        table.append([method, path, f"t2->t1: {r.status_code} {r.json()['code']}"])
    # ... and changed nothing
    assert {j: _snapshot(client, j) for j in (done, queued)} == before

    # 2. the owner gets through on every route (so the 404s above were about the tenant)
    exercised = set()
    for (method, path), row in zip(job_routes, table):
        r = client.request(method, _fill(path, done))
        assert r.status_code != 404, (method, path, r.text)
        assert r.status_code < 500, (method, path, r.text)
        row.append(f"t1->t1: {r.status_code}")
        exercised.add((method, path))
    assert exercised == {(m, p) for m, p in api_routes(client.app) if "{job_id}" in p}
    # t2 reaches its own job the same way
    assert client_t2.get(f"/v1/jobs/{mine}").status_code == 200

    # 3. lists: each tenant sees only its own jobs, whatever the filter or page size
    for params in ({}, {"limit": 1}, {"status": "queued"}, {"status": "succeeded"}):
        ids1 = _all_ids(client, params)
        ids2 = _all_ids(client_t2, params)
        assert mine not in ids1 and done not in ids2 and queued not in ids2
    assert _all_ids(client, {}) == {done, queued} and _all_ids(client_t2, {}) == {mine}
    table.append(["GET", "/v1/jobs", "t1 sees 2 own, 0 of t2's; t2 sees 1 own, 0 of t1's"])

    with capsys.disabled():
        print("\ntenant isolation (t2 = another tenant, t1 = the owner):")
        for row in table:
            print("  " + " | ".join(row))


def _all_ids(client, params: dict) -> set[str]:
    ids, cursor = set(), None
    while True:
        r = client.get("/v1/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        ids |= {j["id"] for j in r.json()["items"]}
        cursor = r.json()["next_cursor"]
        if not cursor:
            return ids


def test_a_cursor_from_another_tenant_reveals_nothing(client, client_t2, subject_bytes):
    for _ in range(3):
        _submit(client, subject_bytes)
    page = client.get("/v1/jobs", params={"limit": 1}).json()
    assert page["next_cursor"]
    r = client_t2.get("/v1/jobs", params={"cursor": page["next_cursor"]})
    assert r.status_code == 200 and r.json()["items"] == []
