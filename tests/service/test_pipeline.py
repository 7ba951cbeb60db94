"""The stage runner behind each Celery task, in-process against PostgreSQL, with a stand-in
engine: claiming, idempotent redelivery, progress throttling, cancel, failures."""
from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from service.jobs import records as jobs
from service.jobs.pipeline import Pipeline, overall_progress
from service.states import (
    ALLOWED,
    IllegalTransition,
    JobStatus,
    StageStatus,
    transition,
    utcnow,
)
from service.store.models import JobEvent, StageRun
from worker.engine.errors import Cancelled

from . import fake_engine


@pytest.fixture
def pipeline(client):
    ctx = client.app.state.ctx
    return Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)


def _job(client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def _run_chain(pipeline: Pipeline, job_id: str, first: str = "validate") -> list[str]:
    ran, stage = [], first
    while stage:
        ran.append(stage)
        stage = pipeline.run(job_id, stage, task_id=str(uuid.uuid4()))
    return ran


# --- state machine --------------------------------------------------------------------------

def test_transition_refuses_illegal_moves_and_stamps_times():
    class J:
        status = JobStatus.queued
        started_at = finished_at = None
        updated_at = None

    for src in JobStatus:
        for dst in JobStatus:
            j = J()
            j.status = src
            if dst in ALLOWED[src]:
                transition(j, dst)
                assert j.status is dst
                assert (j.finished_at is not None) == dst.is_terminal()
            else:
                with pytest.raises(IllegalTransition):
                    transition(j, dst)
                assert j.status is src
    j = J()
    transition(j, JobStatus.running)
    assert j.started_at is not None and j.finished_at is None
    assert [s.value for s in JobStatus if s.is_terminal()] == ["succeeded", "failed", "cancelled"]


def test_overall_progress_is_monotone_and_ends_at_one():
    stages = ["validate", "slice", "mine", "tune", "compare", "export", "evaluate"]
    seq = [overall_progress(stages, i, f) for i in range(len(stages)) for f in (0, .25, .5, 1)]
    assert seq == sorted(seq) and seq[0] == 0 and seq[-1] == pytest.approx(1.0)


# --- the chain ------------------------------------------------------------------------------

def test_chain_runs_every_stage_once_in_order(client, submit, pipeline):
    jid = submit()
    fake_engine.CALLS.clear()
    ran = _run_chain(pipeline, jid)
    assert ran == ["validate", "slice", "mine", "tune", "export", "evaluate"]
    assert fake_engine.CALLS == ran
    job = _job(client, jid)
    assert job["status"] == "succeeded" and job["finished_at"] >= job["started_at"]
    with client.app.state.ctx.factory() as s:
        runs = s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid))
                         .order_by(StageRun.index)).all()
        assert [(r.name, r.status, r.attempts) for r in runs] == \
            [(n, StageStatus.succeeded, 1) for n in ran]
        assert all(r.device == "cpu" and r.duration_s is not None for r in runs)


def test_redelivered_finished_stage_is_skipped_and_changes_nothing(client, submit, pipeline):
    jid = submit()
    _run_chain(pipeline, jid)
    before = _job(client, jid)
    arts_before = client.get(f"/v1/jobs/{jid}/artifacts").json()
    fake_engine.CALLS.clear()
    for stage in ("validate", "export", "evaluate"):
        assert pipeline.run(jid, stage, task_id="redelivered") is None
    assert fake_engine.CALLS == []
    assert _job(client, jid) == before
    assert client.get(f"/v1/jobs/{jid}/artifacts").json() == arts_before


def test_redelivery_after_commit_but_before_enqueue_continues_the_chain(client, submit, pipeline):
    """The worker died after committing 'validate' and before sending 'slice': the redelivered
    'validate' message finds it done and names 'slice' again; a second copy then does not."""
    jid = submit()
    assert pipeline.run(jid, "validate", task_id="t1") == "slice"
    fake_engine.CALLS.clear()
    assert pipeline.run(jid, "validate", task_id="t1") == "slice"
    assert fake_engine.CALLS == []
    assert pipeline.run(jid, "slice", task_id="t2") == "mine"
    assert pipeline.run(jid, "validate", task_id="t1") is None  # slice was claimed: no resend


def test_duplicate_message_while_running_elsewhere_is_dropped(client, submit, pipeline):
    jid = submit()
    ctx = client.app.state.ctx
    with ctx.factory.begin() as s:
        s.add(StageRun(job_id=uuid.UUID(jid), name="validate", index=0, status=StageStatus.running,
                       attempts=1, progress=0.3, task_id="other", heartbeat_at=utcnow()))
    fake_engine.CALLS.clear()
    assert pipeline.run(jid, "validate", task_id="mine-copy") is None
    assert fake_engine.CALLS == []
    # same message delivered again (its worker died): it takes the stage over
    assert pipeline.run(jid, "validate", task_id="other") == "slice"
    assert fake_engine.CALLS == ["validate"]


def test_stale_claim_is_taken_over_and_attempts_are_capped(client, submit, pipeline):
    jid = submit()
    ctx = client.app.state.ctx
    stale = utcnow() - timedelta(seconds=ctx.settings.stage_stale_after_s + 5)
    with ctx.factory.begin() as s:
        s.add(StageRun(job_id=uuid.UUID(jid), name="validate", index=0, status=StageStatus.running,
                       attempts=ctx.settings.stage_max_attempts, progress=0.0, task_id="dead",
                       heartbeat_at=stale))
    assert pipeline.run(jid, "validate", task_id="new") is None
    job = _job(client, jid)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "stage_attempts_exhausted" and job["error"]["stage"] == "validate"


# --- failures -------------------------------------------------------------------------------

def test_input_error_fails_the_job_with_its_code_and_stage(client, submit, pipeline):
    jid = submit(f'{{"seed": {fake_engine.FAIL_INPUT_SEED}}}')
    assert _run_chain(pipeline, jid) == ["validate", "slice", "mine"]
    job = _job(client, jid)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "no_oracles" and job["error"]["stage"] == "mine"
    assert "send more history checkpoints" in job["error"]["message"]
    # a late message for a later stage does nothing
    fake_engine.CALLS.clear()
    assert pipeline.run(jid, "tune", task_id="late") is None and fake_engine.CALLS == []
    kinds = [e["kind"] for e in client.get(f"/v1/jobs/{jid}/events").json()["items"]]
    assert kinds[-1] == "failed"


def test_a_bug_fails_the_job_as_internal_error_with_a_safe_message(client, submit, pipeline):
    jid = submit(f'{{"seed": {fake_engine.FAIL_BUG_SEED}}}')
    _run_chain(pipeline, jid)
    job = _job(client, jid)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "internal_error" and job["error"]["stage"] == "slice"
    assert fake_engine.SECRET not in job["error"]["message"]
    assert jid in job["error"]["message"]


def test_soft_time_limit_is_reported_as_stage_timeout(client, submit):
    class SoftLimit(Exception):
        pass

    def runner(name, ctx):
        raise SoftLimit()

    ctx = client.app.state.ctx
    p = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner, timeout_errors=(SoftLimit,))
    jid = submit()
    assert p.run(jid, "validate", "t") is None
    assert _job(client, jid)["error"]["code"] == "stage_timeout"


def test_cuda_requested_on_a_cpu_worker_fails_with_a_fix(client, submit, pipeline, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    jid = submit('{"device": "cuda"}')
    pipeline.run(jid, "validate", "t")
    err = _job(client, jid)["error"]
    assert err["code"] == "cuda_unavailable" and '"device": "auto"' in err["message"]


# --- progress and cancel --------------------------------------------------------------------

def test_progress_is_written_while_running_but_throttled(client, submit):
    ctx = client.app.state.ctx
    seen: dict[str, float] = {}
    writes = []

    def runner(name, sctx):
        if name != "validate":
            return {}
        t_end = time.monotonic() + 1.0
        n = 0
        while time.monotonic() < t_end:  # thousands of calls in one second
            n += 1
            sctx.progress(min(0.9, n / 20000))
        time.sleep(ctx.settings.progress_interval_s + 0.05)
        sctx.progress(0.95)  # due: the interval has passed
        seen["job"] = client.get(f"/v1/jobs/{jid}").json()
        seen["calls"] = n
        return {}

    from service.jobs import pipeline as pmod

    real_flush = pmod._ProgressWriter.flush

    def counting_flush(self):
        writes.append(time.monotonic())
        real_flush(self)

    pmod._ProgressWriter.flush = counting_flush
    try:
        p = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner)
        jid = submit()
        p.run(jid, "validate", "t")
    finally:
        pmod._ProgressWriter.flush = real_flush
    assert seen["calls"] > 1000
    # at most one write per interval (plus one)
    assert 1 <= len(writes) <= int(1.3 / ctx.settings.progress_interval_s) + 2
    job = seen["job"]
    assert job["status"] == "running" and job["stage"]["name"] == "validate"
    assert job["stage"]["progress"] == pytest.approx(0.95)
    assert 0 < job["progress"] < 1


def test_cancel_is_honoured_between_batches(client, submit):
    ctx = client.app.state.ctx
    started = threading.Event()
    polls = []

    def runner(name, sctx):
        started.set()
        for _ in range(2000):  # "batches"
            polls.append(1)
            if sctx.cancelled():
                raise Cancelled()
            time.sleep(0.01)
        raise AssertionError("cancel was never seen")

    p = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner)
    jid = submit()
    t = threading.Thread(target=p.run, args=(jid, "validate", "t"))
    t.start()
    assert started.wait(30)
    t0 = time.monotonic()
    r = client.post(f"/v1/jobs/{jid}/cancel")
    assert r.json()["status"] == "cancelling"
    t.join(30)
    assert not t.is_alive()
    assert time.monotonic() - t0 < ctx.settings.cancel_poll_interval_s + 2
    job = _job(client, jid)
    assert job["status"] == "cancelled" and job["finished_at"]
    with ctx.factory() as s:
        run = s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid))).one()
        assert run.status is StageStatus.cancelled
        # polled often, read from the database rarely
        n_events = s.scalar(select(func.count()).select_from(JobEvent)
                            .where(JobEvent.job_id == uuid.UUID(jid)))
    assert len(polls) > 5 and n_events < 10


def test_cancel_requested_during_a_stage_stops_the_chain_at_its_end(client, submit, pipeline):
    jid = submit()
    assert pipeline.run(jid, "validate", "t1") == "slice"
    ctx = client.app.state.ctx
    # the stage ignores cancelled(): the boundary check catches it
    with ctx.factory.begin() as s:
        job = jobs.get_job(s, uuid.UUID(jid), for_update=True)
        transition(job, JobStatus.cancelling)  # validate made it running
    assert pipeline.run(jid, "slice", "t2") is None
    assert _job(client, jid)["status"] == "cancelled"


def test_engine_cancel_without_request_still_ends_cancelled(client, submit):
    ctx = client.app.state.ctx

    def runner(name, sctx):
        raise Cancelled()

    jid = submit()
    Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner).run(jid, "validate", "t")
    assert _job(client, jid)["status"] == "cancelled"


def test_unknown_or_malformed_job_ids_are_dropped(pipeline):
    assert pipeline.run(str(uuid.uuid4()), "validate", "t") is None
    assert pipeline.run("not-a-uuid", "validate", "t") is None


def test_fail_is_idempotent_and_never_overwrites_an_end(client, submit, pipeline):
    jid = submit()
    _run_chain(pipeline, jid)
    pipeline.fail(jid, "evaluate", "internal_error", "late")
    assert _job(client, jid)["status"] == "succeeded"

