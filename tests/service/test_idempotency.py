"""Idempotency-Key on POST /v1/jobs: a retry gets the same job and stores nothing, a different
request under the same key is a 422, keys are per tenant, and concurrent twins make one job."""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.api import idempotency, submission
from service.api.uploads import ReceivedFile, ReceivedForm

from .conftest import submit_files, tenant_id

PROBLEM = "application/problem+json"


def _post(client, subject_bytes, key: str | None, config: str = '{"q": 0.9}'):
    files, data = submit_files(subject_bytes, config=config)
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/jobs", files=files, data=data, headers=headers)


def _stored_jobs(settings) -> list[str]:
    root = settings.artifact_root / "jobs"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_same_key_same_request_returns_the_same_job_and_stores_nothing(client, dispatcher,
                                                                       subject_bytes, settings):
    key = str(uuid.uuid4())
    first = _post(client, subject_bytes, key)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    again = _post(client, subject_bytes, key)
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.json() == client.get(first.headers["location"]).json()
    assert again.json()["id"] == first.json()["id"]
    # one job, one message, one copy of the inputs; the replay's upload is gone
    assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [first.json()["id"]]
    assert dispatcher.sent == [(first.json()["id"], "validate")]
    assert _stored_jobs(settings) == [first.json()["id"]]
    assert list(settings.upload_tmp_dir.iterdir()) == []


def test_same_key_different_request_is_422(client, subject_bytes, settings):
    key = "order-42"
    first = _post(client, subject_bytes, key).json()
    for config in ('{"q": 0.8}', '{"q": 0.9, "p": 1}'):  # other values; same values + a default
        r = _post(client, subject_bytes, key, config=config)
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
        body = r.json()
        assert body["code"] == "idempotency_key_reused" and body["job_id"] == first["id"]
        assert "order-42" in body["detail"] and "new key" in body["detail"]
    other_bytes = {**subject_bytes, "history": subject_bytes["history"] + b"\0"}
    assert _post(client, other_bytes, key).json()["code"] == "idempotency_key_reused"
    assert _stored_jobs(settings) == [first["id"]]
    assert list(settings.upload_tmp_dir.iterdir()) == []


def test_keys_belong_to_a_tenant_and_no_key_means_a_new_job(client, client_t2, subject_bytes):
    key = "shared-key"
    a = _post(client, subject_bytes, key)
    b = _post(client_t2, subject_bytes, key)  # same key, same bytes, another tenant
    assert a.status_code == 202 and b.status_code == 202
    assert a.json()["id"] != b.json()["id"]
    c, d = _post(client, subject_bytes, None), _post(client, subject_bytes, None)
    assert c.status_code == d.status_code == 202 and c.json()["id"] != d.json()["id"]


@pytest.mark.parametrize("bad", ["", "a" * 256, "has space", "tab\tkey"])
def test_malformed_key_is_422(client, subject_bytes, bad):
    r = _post(client, subject_bytes, bad)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert "Idempotency-Key" in r.json()["detail"]


def test_concurrent_twins_make_one_job(client, dispatcher, subject_bytes, settings):
    # all four in flight at once (past the default per-tenant cap of 2), so the twins race
    client.app.state.ctx.settings = settings.model_copy(
        update={"max_inflight_submissions_per_tenant": 4})
    key = str(uuid.uuid4())
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _post(client, subject_bytes, key), range(4)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 202], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(dispatcher.sent) == 1
    assert len(_stored_jobs(settings)) == 1
    assert list(settings.upload_tmp_dir.iterdir()) == []


def test_a_twin_that_loses_the_unique_constraint_answers_with_the_winner(
        client, dispatcher, subject_bytes, settings, tmp_path, monkeypatch):
    """Where the row lock does not serialise twins, the unique (tenant_id, idempotency_key)
    does: the loser's insert fails, its stored inputs are removed and it replays the winner."""
    key = "race"
    winner = _post(client, subject_bytes, key).json()
    real_find = idempotency.find
    calls = []

    def late_find(session, tenant, k):  # noqa: ANN001, ANN202
        calls.append(k)  # the winner commits after both of our looks
        return None if len(calls) <= 2 else real_find(session, tenant, k)

    monkeypatch.setattr(idempotency, "find", late_find)
    ctx = client.app.state.ctx
    staging = tmp_path / "staging"
    staging.mkdir()
    form = ReceivedForm(staging=staging, fields={"dataset": "digits", "config": '{"q": 0.9}'})
    for field, name in (("model", "model.onnx"), ("history", "history.zip")):
        path = staging / name
        path.write_bytes(subject_bytes[field])
        got = client.get(f"/v1/jobs/{winner['id']}").json()["inputs"]
        sha = next(i["sha256"] for i in got if i["field"] == field)
        form.files[field] = ReceivedFile(field=field, filename=name, suffix=path.suffix, path=path,
                                         size=len(subject_bytes[field]), sha256=sha)
    loser_id = uuid.uuid4()
    done = submission.submit(form, job_id=loser_id, tenant_id=tenant_id(ctx.factory, "t1"),
                             factory=ctx.factory, store=ctx.store, dispatcher=ctx.dispatcher,
                             max_active_jobs=100, idempotency_key=key,
                             settings=ctx.settings.model_copy(update={"submit_inspection": "off"}))
    assert done.replayed and str(done.job.id) == winner["id"]
    assert len(calls) == 3
    leftovers = [p for p in (settings.artifact_root / "jobs" / str(loser_id)).rglob("*")
                 if p.is_file()]
    assert leftovers == []
    assert len(dispatcher.sent) == 1
