"""Behaviours that one-line mutants used to get past (issue 14): each test sets the one thing
the behaviour depends on away from where the other tests leave it (a same-size change, a stage
that started long ago with a fresh heartbeat, a cancel that lands mid-upload)."""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from service.jobs import records as jobs
from service.jobs.pipeline import Pipeline
from service.jobs.reconciler import reconcile_once
from service.states import JobStatus, StageStatus, utcnow
from service.store.models import Artifact, StageRun

from . import fake_engine
from .conftest import submit_files
from .test_reconciler import CHAIN, ctx  # noqa: F401 (ctx is a fixture)

# --- idempotency: the hash covers what the files hold, not only their sizes -----------------

def _post(client, subject_bytes, key: str):
    files, data = submit_files(subject_bytes, config='{"q": 0.9}')
    return client.post("/v1/jobs", files=files, data=data, headers={"Idempotency-Key": key})


def _flip_last_byte(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 0xFF])


@pytest.mark.parametrize("field", ["model", "history"])
def test_a_same_size_change_of_a_file_is_another_request(client, subject_bytes, field):
    key = f"same-size-{field}"
    first = _post(client, subject_bytes, key)
    assert first.status_code == 202, first.text
    changed = {**subject_bytes, field: _flip_last_byte(subject_bytes[field])}
    assert len(changed[field]) == len(subject_bytes[field])
    r = _post(client, changed, key)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "idempotency_key_reused"
    assert r.json()["job_id"] == first.json()["id"]
    # and the unchanged bytes still replay the first job
    assert _post(client, subject_bytes, key).status_code == 200


# --- the lease: its age runs from the last heartbeat, not from the stage's start --------------

# ``ctx``: test_reconciler's fixture (30 s requeue, 20 s stale lease, 0.2 s heartbeat)


def _claimed_long_ago(ctx, jid: str, stage: str, *, started_s: float, beat_s: float) -> None:
    """``stage`` held by another worker that started it ``started_s`` ago and last renewed its
    lease ``beat_s`` ago."""
    now = utcnow()
    with ctx.factory.begin() as s:
        run = s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid),
                                               StageRun.name == stage)).one()
        run.status, run.attempts, run.task_id, run.worker = StageStatus.running, 1, "other", "h/1"
        run.started_at = now - timedelta(seconds=started_s)
        run.heartbeat_at = now - timedelta(seconds=beat_s)
        job = jobs.get_job(s, uuid.UUID(jid), for_update=True)
        job.stage_name, job.stage_index = stage, CHAIN.index(stage)


def _run_row(ctx, jid: str, stage: str) -> StageRun:
    with ctx.factory() as s:
        return s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid),
                                                StageRun.name == stage)).one()


def test_a_long_stage_with_a_fresh_heartbeat_keeps_its_lease(ctx, submit, dispatcher):
    """An hour into a stage, a heartbeat 1 s old: the reconciler re-sends nothing and a duplicate
    message is dropped; with the heartbeat 21 s old (lease 20 s) both take the stage over."""
    jid = submit()
    p = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)
    assert p.run(jid, "validate", "t1") == "slice"
    _claimed_long_ago(ctx, jid, "slice", started_s=3600, beat_s=1)
    dispatcher.sent.clear()
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {}
    assert dispatcher.sent == []
    calls: list[str] = []

    def runner(name, sctx):
        calls.append(name)
        return fake_engine.run_stage(name, sctx)

    dup = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner)
    assert dup.run(jid, "slice", "duplicate") is None
    assert calls == [] and _run_row(ctx, jid, "slice").task_id == "other"

    # the same stage, started a moment ago, whose lease was last renewed 21 s ago: expired
    _claimed_long_ago(ctx, jid, "slice", started_s=21, beat_s=21)
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"lease_expired": 1}
    assert dispatcher.sent == [(jid, "slice")]
    assert dup.run(jid, "slice", "resent") == "mine"
    assert calls == ["slice"] and _run_row(ctx, jid, "slice").task_id == "resent"


# --- a cancel that lands while the stage uploads its artifacts ------------------------------

class _CancelOnFirstArtifact:
    """The real store; the first artifact upload lets a cancel in (as an API call would) before
    it writes, so the cancel lands between the stage's two transactions."""

    def __init__(self, store, factory, job_id: uuid.UUID) -> None:
        self._store, self._factory, self._job_id = store, factory, job_id
        self.put_uris: list[str] = []

    def put(self, key: str, src, *, move: bool = False) -> str:
        if "/artifacts/" in key and not self.put_uris:
            with self._factory.begin() as s:
                jobs.request_cancel(s, self._job_id)
        uri = self._store.put(key, src, move=move)
        if "/artifacts/" in key:
            self.put_uris.append(uri)
        return uri

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_cancel_during_the_artifact_upload_removes_what_was_uploaded(ctx, submit, client):
    jid = submit()
    plain = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)
    for stage in CHAIN[:4]:
        plain.run(jid, stage, f"t-{stage}")
    spy = _CancelOnFirstArtifact(ctx.store, ctx.factory, uuid.UUID(jid))
    p = Pipeline(ctx.settings, ctx.factory, spy, runner=fake_engine.run_stage)
    assert p.run(jid, "export", "t-export") is None
    assert len(spy.put_uris) >= 2  # hardened.onnx and hardened.safetensors went up
    assert client.get(f"/v1/jobs/{jid}").json()["status"] == "cancelled"
    with ctx.factory() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == uuid.UUID(jid))).all() == []
    assert [u for u in spy.put_uris if ctx.store.exists(u)] == []
    assert _run_row(ctx, jid, "export").status is StageStatus.cancelled
    with ctx.factory() as s:
        assert jobs.get_job(s, uuid.UUID(jid)).status is JobStatus.cancelled
