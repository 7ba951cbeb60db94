"""The reconciler and the stage lease, in-process against PostgreSQL (and Redis db for the broker
look-up): what it re-sends, when, how often; that duplicates are dropped; attempts are capped;
cancelled jobs end up with no artifacts. Job ages are made by moving the job's timestamps back."""
from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from service.jobs import records as jobs
from service.jobs.background import Background
from service.jobs.dispatch import CeleryDispatcher
from service.jobs.pipeline import Pipeline
from service.jobs.reconciler import queued_messages, reconcile_once
from service.states import JobStatus, StageStatus, transition, utcnow
from service.store.models import Artifact, Job, JobEvent, StageRun

from . import fake_engine
from .conftest import REDIS_URL, RecordingDispatcher, submit_files

CHAIN = ["validate", "slice", "mine", "tune", "export", "evaluate"]


@pytest.fixture
def ctx(client):
    c = client.app.state.ctx
    c.settings.requeue_after_s = 30.0
    c.settings.stage_stale_after_s = 20
    c.settings.heartbeat_interval_s = 0.2
    return c


@pytest.fixture
def pipeline(ctx):
    return Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)


@pytest.fixture
def empty_broker():
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    yield
    r.flushdb()


def _age(ctx, jid: str, seconds: float) -> None:
    """Pretend everything recorded about the job happened ``seconds`` earlier."""
    q = {"j": uuid.UUID(jid), "d": timedelta(seconds=seconds)}
    with ctx.engine.begin() as c:
        c.execute(text("UPDATE jobs SET created_at = created_at - :d, updated_at = updated_at - :d "
                       "WHERE id = :j"), q)
        c.execute(text("UPDATE stage_runs SET started_at = started_at - :d, heartbeat_at = "
                       "heartbeat_at - :d, finished_at = finished_at - :d WHERE job_id = :j"), q)
        c.execute(text("UPDATE job_events SET at = at - :d WHERE job_id = :j"), q)


def _reconcile(ctx, dispatcher) -> dict:
    return reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store)


def _at_the_edge(ctx, dispatcher, monkeypatch, edge, before: dict, at: dict,
                 just: timedelta = timedelta(microseconds=1)) -> None:
    """A pass a moment before ``edge`` answers ``before``, one at ``edge`` exactly ``at``."""
    from service.jobs import reconciler

    monkeypatch.setattr(reconciler, "utcnow", lambda: edge - just)
    assert _reconcile(ctx, dispatcher) == before
    monkeypatch.setattr(reconciler, "utcnow", lambda: edge)
    assert _reconcile(ctx, dispatcher) == at


def _events(ctx, jid: str, kind: str) -> list[JobEvent]:
    with ctx.factory() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(jid),
                                                     JobEvent.kind == kind).order_by(JobEvent.id)))


def _run(ctx, jid: str, stage: str) -> StageRun:
    with ctx.factory() as s:
        return s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid),
                                                StageRun.name == stage)).one()


def _kill_claim(ctx, jid: str, stage: str, attempts: int = 1) -> None:
    """Make ``stage`` look claimed by a worker that then died (its lease is as old as the
    job's last _age)."""
    with ctx.factory.begin() as s:
        run = s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid),
                                               StageRun.name == stage)).one()
        run.status, run.attempts, run.task_id, run.worker = StageStatus.running, attempts, "dead", "h/1"
        run.started_at = run.heartbeat_at = utcnow()
        job = jobs.get_job(s, uuid.UUID(jid), for_update=True)
        job.stage_name, job.stage_index = stage, CHAIN.index(stage)


# --- re-sending -----------------------------------------------------------------------------

def test_unclaimed_first_stage_is_resent_once_per_requeue_interval(ctx, submit, dispatcher, empty_broker):
    jid = submit()
    assert dispatcher.sent == [(jid, "validate")]
    assert _reconcile(ctx, dispatcher) == {}  # young: its message may be waiting its turn
    _age(ctx, jid, 31)
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1}
    assert _reconcile(ctx, dispatcher) == {"throttled": 1}  # not again within requeue_after_s
    assert dispatcher.sent == [(jid, "validate")] * 2
    [ev] = _events(ctx, jid, "requeued")
    assert ev.stage == "validate" and ev.data["reason"] == "not_picked_up"
    assert ev.data["attempts"] == 0  # no worker ever took it
    _age(ctx, jid, 31)
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1}
    assert len(_events(ctx, jid, "requeued")) == 2
    _age(ctx, jid, 31)  # still stuck after two re-sends: the wait has doubled to 60 s
    assert _reconcile(ctx, dispatcher) == {"throttled": 1}
    _age(ctx, jid, 31)
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1}
    assert dispatcher.sent == [(jid, "validate")] * 4


def test_a_message_still_waiting_in_redis_is_not_resent(ctx, submit, empty_broker):
    jid = submit()
    ctx.settings.broker_url = REDIS_URL
    CeleryDispatcher(ctx.settings).enqueue(jid, "validate")  # a real kombu message, db 7
    assert queued_messages(ctx.settings) == {(jid, "validate")}
    _age(ctx, jid, 31)
    recorder = RecordingDispatcher()
    assert _reconcile(ctx, recorder) == {}  # a long queue, not a lost message
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()  # now it is lost
    assert queued_messages(ctx.settings) == set()
    assert _reconcile(ctx, recorder) == {"not_picked_up": 1}
    assert recorder.sent == [(jid, "validate")]


def test_the_embedded_filesystem_broker_can_be_looked_into_too(tmp_path):
    from service.settings import Settings

    st = Settings(home=tmp_path, database_url="sqlite://")
    st.ensure_dirs()
    jid = str(uuid.uuid4())
    assert queued_messages(st) == set()
    CeleryDispatcher(st).enqueue(jid, "mine")
    assert queued_messages(st) == {(jid, "mine")}


def test_next_stage_lost_after_the_commit_is_resent(ctx, submit, pipeline, dispatcher, empty_broker):
    """The worker committed 'validate' and died (or the send failed) before 'slice' went out."""
    jid = submit()
    assert pipeline.run(jid, "validate", "t1") == "slice"  # ... and never sent
    dispatcher.sent.clear()
    assert _reconcile(ctx, dispatcher) == {}
    _age(ctx, jid, 31)
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1}
    assert dispatcher.sent == [(jid, "slice")]


def test_expired_lease_is_resent_taken_over_and_duplicates_are_dropped(ctx, submit, pipeline,
                                                                      dispatcher, empty_broker):
    jid = submit()
    assert pipeline.run(jid, "validate", "t1") == "slice"
    _kill_claim(ctx, jid, "slice")
    dispatcher.sent.clear()
    assert _reconcile(ctx, dispatcher) == {}  # the lease is fresh
    _age(ctx, jid, 21)
    assert _reconcile(ctx, dispatcher) == {"lease_expired": 1}
    assert dispatcher.sent == [(jid, "slice")]
    [ev] = _events(ctx, jid, "requeued")
    assert ev.stage == "slice" and ev.data["reason"] == "lease_expired" and ev.data["attempts"] == 1

    # The re-sent message takes the stage over; while it runs, two more copies come in.
    gate, entered = threading.Event(), threading.Event()
    calls: list[str] = []

    def runner(name, sctx):
        calls.append(name)
        entered.set()
        assert gate.wait(30)
        return fake_engine.run_stage(name, sctx)

    p = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner)
    out: list = []
    t = threading.Thread(target=lambda: out.append(p.run(jid, "slice", "resent-1")))
    t.start()
    try:
        assert entered.wait(30)
        beat0 = _run(ctx, jid, "slice").heartbeat_at
        time.sleep(0.8)  # the engine reports no progress; the heartbeat thread renews the lease
        assert _run(ctx, jid, "slice").heartbeat_at > beat0
        assert p.run(jid, "slice", "duplicate-1") is None  # dropped: a live lease
        assert _reconcile(ctx, dispatcher) == {}
    finally:
        gate.set()
        t.join(30)
    assert out == ["mine"] and calls == ["slice"]
    p.run(jid, "slice", "duplicate-2")  # after it finished: skipped (it may name 'mine' again)
    assert calls == ["slice"]
    run = _run(ctx, jid, "slice")
    assert run.status is StageStatus.succeeded and run.attempts == 2 and run.task_id == "resent-1"
    assert len(_events(ctx, jid, "stage_finished")) == 2  # validate, slice: once each
    assert not [th for th in threading.enumerate() if th.name.startswith("heartbeat-")]


def test_a_stage_that_loses_its_lease_publishes_nothing(ctx, submit, pipeline):
    """A worker that stalled past its lease and was replaced must not record the stage."""
    jid = submit()
    for stage in CHAIN[:4]:
        pipeline.run(jid, stage, f"t-{stage}")

    def runner(name, sctx):
        with ctx.factory.begin() as s:  # meanwhile another message took the stage over
            s.execute(StageRun.__table__.update().where(StageRun.job_id == uuid.UUID(jid),
                                                        StageRun.name == name)
                      .values(task_id="usurper"))
        return fake_engine.run_stage(name, sctx)

    assert Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner).run(
        jid, "export", "stalled") is None
    assert _run(ctx, jid, "export").status is StageStatus.running  # still the usurper's
    with ctx.factory() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == uuid.UUID(jid))).all() == []


# --- ends -----------------------------------------------------------------------------------

def test_worker_lost_every_time_fails_the_job_after_max_attempts(ctx, submit, pipeline, dispatcher):
    jid = submit()
    pipeline.run(jid, "validate", "t1")
    _kill_claim(ctx, jid, "slice", attempts=ctx.settings.stage_max_attempts)
    _age(ctx, jid, 21)
    dispatcher.sent.clear()
    assert _reconcile(ctx, dispatcher) == {"failed": 1}
    assert dispatcher.sent == []
    with ctx.factory() as s:
        job = s.get(Job, uuid.UUID(jid))
    assert job.status is JobStatus.failed and job.error_code == "stage_attempts_exhausted"
    assert job.error_stage == "slice" and "3 times" in job.error_message
    assert _reconcile(ctx, dispatcher) == {}  # nothing loops


def _artifact_files(ctx, jid: str) -> list[str]:
    d = ctx.settings.artifact_root / "jobs" / jid / "artifacts"
    return sorted(f.name for f in d.iterdir()) if d.is_dir() else []


def _artifact_rows(ctx, jid: str) -> list[str]:
    with ctx.factory() as s:
        return [a.name for a in jobs.list_artifacts(s, uuid.UUID(jid))]


def test_cancelled_jobs_publish_no_artifacts(ctx, submit, pipeline, dispatcher, client):
    # (1) cancelled while a worker that died held the last stage: the reconciler ends it
    a = submit()
    for stage in CHAIN[:5]:
        pipeline.run(a, stage, f"t-{stage}")
    assert "hardened.onnx" in _artifact_rows(ctx, a) and _artifact_files(ctx, a)
    _kill_claim(ctx, a, "evaluate")
    assert client.post(f"/v1/jobs/{a}/cancel").json()["status"] == "cancelling"
    assert _reconcile(ctx, dispatcher) == {}  # the worker may still be alive: wait for its lease
    _age(ctx, a, 21)
    assert _reconcile(ctx, dispatcher) == {"cancelled": 1}
    assert client.get(f"/v1/jobs/{a}").json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{a}/artifacts").json() in ([], {"items": []})
    assert _artifact_rows(ctx, a) == [] and _artifact_files(ctx, a) == []
    assert _run(ctx, a, "evaluate").status is StageStatus.cancelled

    # (2) the cancel arrives while 'export' runs and the stage ignores it: it registers nothing
    b = submit()
    for stage in CHAIN[:4]:
        pipeline.run(b, stage, f"t-{stage}")

    def runner(name, sctx):
        with ctx.factory.begin() as s:
            jobs.request_cancel(s, uuid.UUID(b))
        return fake_engine.run_stage(name, sctx)  # writes hardened.* anyway

    assert Pipeline(ctx.settings, ctx.factory, ctx.store, runner=runner).run(b, "export", "t") is None
    assert client.get(f"/v1/jobs/{b}").json()["status"] == "cancelled"
    assert _artifact_rows(ctx, b) == [] and _artifact_files(ctx, b) == []

    # (3) the engine stops on the cancel flag in 'evaluate': earlier stages' artifacts go too
    c = submit()
    for stage in CHAIN[:5]:
        pipeline.run(c, stage, f"t-{stage}")
    published = _artifact_rows(ctx, c)
    assert published and _artifact_files(ctx, c)
    with ctx.factory.begin() as s:
        jobs.request_cancel(s, uuid.UUID(c))
    assert pipeline.run(c, "evaluate", "t") is None
    assert _artifact_rows(ctx, c) == [] and _artifact_files(ctx, c) == []
    [ev] = _events(ctx, c, "cancelled")
    assert ev.data == {"artifacts_removed": len(published)}


def test_cancelling_job_whose_next_stage_was_never_claimed_is_cancelled(ctx, submit, pipeline,
                                                                        dispatcher):
    jid = submit()
    assert pipeline.run(jid, "validate", "t1") == "slice"
    with ctx.factory.begin() as s:
        job = jobs.get_job(s, uuid.UUID(jid), for_update=True)
        transition(job, JobStatus.cancelling)
    assert _reconcile(ctx, dispatcher) == {"cancelled": 1}
    assert _run(ctx, jid, "slice").status is StageStatus.cancelled


# --- where it runs --------------------------------------------------------------------------

def test_background_runs_each_task_on_its_interval_and_survives_errors(caplog):
    bg = Background()
    ticks: list[float] = []

    def boom() -> None:
        raise RuntimeError("tick failed")

    bg.add("ticks", 0.05, lambda: ticks.append(time.monotonic()))
    bg.add("boom", 0.05, boom)
    bg.add("off", 0, lambda: ticks.append(-1.0))  # 0 disables
    with pytest.raises(ValueError):
        bg.add("ticks", 1, lambda: None)
    bg.start()
    late: list[int] = []
    bg.add("late", 0.05, lambda: late.append(1))  # registered after start: runs too
    time.sleep(0.6)
    bg.stop()
    n = len(ticks)
    time.sleep(0.2)
    assert len(ticks) == n >= 4 and -1.0 not in ticks and late
    assert bg.names == ["ticks", "boom", "late"]
    assert "background task boom failed" in caplog.text
    assert not [t for t in threading.enumerate() if t.name.startswith("background-")]


def test_the_api_runs_the_reconciler(settings, subject_bytes, empty_broker):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings.reconcile_interval_s, settings.requeue_after_s = 0.2, 0.5
    recorder = RecordingDispatcher()
    app = create_app(settings, dispatcher=recorder)
    assert app.state.background.names == ["reconcile"] or "reconcile" in app.state.background.names
    with TestClient(app) as c:
        c.headers.update(client_headers(c))
        files, data = submit_files(subject_bytes)
        jid = c.post("/v1/jobs", files=files, data=data).json()["id"]
        deadline = time.monotonic() + 10
        while recorder.sent.count((jid, "validate")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    app.state.ctx.engine.dispose()
    assert recorder.sent.count((jid, "validate")) >= 2  # the first send, then the API's re-send


def client_headers(c) -> dict[str, str]:
    """A bearer key for tenant t1 when the API has authentication, nothing otherwise."""
    try:
        from service.api.auth import create_api_key
    except ImportError:
        return {}
    with c.app.state.ctx.factory() as s:
        key = create_api_key(s, "t1")
        s.commit()
    return {"Authorization": f"Bearer {key}"}


def test_dare_reconcile_once_prints_what_it_did(settings, tmp_path, empty_broker):
    import json
    import subprocess

    from .conftest import REPO, dare_cmd, service_env

    env = service_env(DARE_HOME=str(tmp_path), DARE_DATABASE_URL=settings.database_url,
                      DARE_BROKER_URL=REDIS_URL)
    r = subprocess.run(dare_cmd("reconcile", "--once"), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}


# --- edges the tests above leave open (each found by a surviving mutant, bench/mutation.py) ---

def test_a_dead_first_claim_is_resent_like_any_other(ctx, submit, pipeline, dispatcher, empty_broker):
    """The job's only stage run so far (validate) was claimed and its worker died: one run, no
    earlier stage to date the wait from, still an expired lease to re-send."""
    jid = submit()
    pipeline._claim(uuid.UUID(jid), "validate", "dead")  # claimed; the worker never comes back
    dispatcher.sent.clear()
    _age(ctx, jid, 21)
    assert _reconcile(ctx, dispatcher) == {"lease_expired": 1}
    assert dispatcher.sent == [(jid, "validate")]


def test_the_requeue_wait_ends_exactly_at_its_length(ctx, submit, dispatcher, empty_broker,
                                                     monkeypatch):
    """requeue_after_s after the last re-send the stage goes out again; a moment before, not."""
    jid = submit()
    _age(ctx, jid, 31)
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1}
    [ev] = _events(ctx, jid, "requeued")
    wait = timedelta(seconds=ctx.settings.requeue_after_s)
    _at_the_edge(ctx, dispatcher, monkeypatch, ev.at + wait, {"throttled": 1},
                 {"not_picked_up": 1})


class _FlakyDispatcher(RecordingDispatcher):
    """The broker refuses the first send and takes the rest."""

    def enqueue(self, job_id: str, stage: str) -> None:
        if not self.fail:
            self.fail = True
            raise ConnectionError("broker down (test)")
        self.sent.append((job_id, stage))


def test_a_failed_resend_is_counted_and_the_other_jobs_still_go_out(ctx, submit, empty_broker):
    a, b = submit(), submit()
    _age(ctx, a, 31)
    _age(ctx, b, 31)
    flaky = _FlakyDispatcher()
    assert _reconcile(ctx, flaky) == {"not_picked_up": 2, "send_errors": 1}
    assert len(flaky.sent) == 1 and flaky.sent[0][1] == "validate"
    assert len(_events(ctx, a, "requeued")) == len(_events(ctx, b, "requeued")) == 1


def test_the_reconciler_works_through_the_store_it_is_given(ctx, submit, dispatcher,
                                                            monkeypatch, empty_broker):
    """Given a store, it never builds one of its own from the settings (which may name another
    bucket or none)."""
    from service.jobs import reconciler

    def other_store(settings):
        raise AssertionError("the reconciler built a store of its own")

    monkeypatch.setattr(reconciler, "store_from_settings", other_store)
    jid = submit()
    _age(ctx, jid, 31)
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1}


@pytest.mark.parametrize("level", [3, 6, 9])
def test_a_message_at_any_priority_level_counts_as_waiting(ctx, submit, empty_broker, level):
    """kombu keeps a message of priority > 0 in a list of its own beside the queue (the queue's
    name, a separator, the level); one waiting there is not lost either."""
    import redis

    jid = submit()
    ctx.settings.broker_url = REDIS_URL
    CeleryDispatcher(ctx.settings).enqueue(jid, "validate")
    r = redis.Redis.from_url(REDIS_URL)
    queue = ctx.settings.queue
    raw = r.lpop(queue)
    r.lpush(f"{queue}\x06\x16{level}", raw)
    assert queued_messages(ctx.settings) == {(jid, "validate")}


def test_a_waiting_method_message_is_told_apart_from_its_stage(ctx, submit, empty_broker):
    """A fanned-out method's message (compare:<method>) waits as that method, not as compare."""
    jid = submit()
    ctx.settings.broker_url = REDIS_URL
    CeleryDispatcher(ctx.settings).enqueue(jid, "compare:trades")
    CeleryDispatcher(ctx.settings).enqueue(jid, "validate")
    assert queued_messages(ctx.settings) == {(jid, "compare:trades"), (jid, "validate")}


def test_a_job_that_cannot_be_reconciled_does_not_stop_the_others(ctx, submit, dispatcher,
                                                                  empty_broker):
    """A job whose record is odd (here: no stages at all) is counted as an error and skipped;
    the jobs after it in the pass are still looked at."""
    odd, good = submit(), submit()
    with ctx.engine.begin() as c:
        c.execute(text("UPDATE jobs SET stages = '[]' WHERE id = :j"), {"j": uuid.UUID(odd)})
    _age(ctx, odd, 40)  # the older one: first in the pass
    _age(ctx, good, 31)
    dispatcher.sent.clear()
    assert _reconcile(ctx, dispatcher) == {"errors": 1, "not_picked_up": 1}
    assert dispatcher.sent == [(good, "validate")]


def test_a_retention_failure_is_one_error_and_the_pass_goes_on(ctx, submit, dispatcher,
                                                               monkeypatch, empty_broker):
    from service.jobs import reconciler

    def broken(*_a, **_k):
        raise OSError("disk gone (test)")

    monkeypatch.setattr(reconciler, "expire_finished", broken)
    jid = submit()
    _age(ctx, jid, 31)
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1, "errors": 1}


def test_malformed_broker_messages_are_skipped_not_fatal():
    """Whatever else sits in the queue (foreign tasks, truncated or odd envelopes), the stage
    messages beside it are still recognised."""
    import base64
    import json

    from service.jobs.reconciler import _parse_all

    def envelope(task, args, encode=True):
        body = json.dumps([args, {}, {}])
        return json.dumps({"headers": {"task": task},
                           "body": base64.b64encode(body.encode()).decode() if encode else body,
                           "properties": {"body_encoding": "base64"} if encode else {}})

    jid = str(uuid.uuid4())
    odd = [b"{not json", json.dumps({"headers": {"task": "dare.stage.tune"}}),  # no body
           envelope("dare.stage.tune", []),  # no arguments
           envelope("dare.stage.tune", 7, encode=False),  # arguments not a list
           envelope("celery.ping", [jid])]  # not a stage task
    good = [envelope("dare.stage.tune", [jid]), envelope("dare.stage.tune", [jid, "pgd"], False)]
    assert _parse_all(odd + good) == {(jid, "tune"), (jid, "tune:pgd")}


def test_a_broker_that_cannot_be_looked_into_leaves_the_age_rule(ctx):
    """Unreachable (nothing listens on port 1): unknown, not an error, so the reconciler goes on
    deciding by age alone."""
    assert queued_messages(ctx.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})) is None


def test_the_backoff_stops_doubling_at_32_times_the_wait(ctx, submit, dispatcher, empty_broker,
                                                         monkeypatch):
    """Eight re-sends already and still stuck: the next waits 32 x requeue_after_s (30 s here),
    not 64 x and not 16 x."""
    jid = submit()
    _age(ctx, jid, 5000)
    with ctx.factory.begin() as s:
        for _ in range(8):
            jobs.add_event(s, uuid.UUID(jid), "requeued", "validate", {"reason": "not_picked_up"})
    last = max(e.at for e in _events(ctx, jid, "requeued"))
    cap = timedelta(seconds=32 * ctx.settings.requeue_after_s)
    _at_the_edge(ctx, dispatcher, monkeypatch, last + cap, {"throttled": 1},
                 {"not_picked_up": 1}, just=timedelta(seconds=1))


def test_a_job_a_worker_holds_locked_is_skipped_not_waited_for(ctx, submit, dispatcher,
                                                               empty_broker):
    """A worker's claim holds the job's row lock for a moment: the pass skips that job (the
    next pass sees it) instead of queueing behind the lock."""
    jid = submit()
    _age(ctx, jid, 31)
    with ctx.factory.begin() as s:
        s.execute(text("SELECT 1 FROM jobs WHERE id = :j FOR UPDATE"), {"j": uuid.UUID(jid)})
        out = {}
        t = threading.Thread(target=lambda: out.update(r=_reconcile(ctx, dispatcher)))
        t.start()
        t.join(timeout=20)
        finished = not t.is_alive()
    t.join()
    assert finished and out["r"] == {}
    assert _reconcile(ctx, dispatcher) == {"not_picked_up": 1}  # lock gone: handled


def test_a_claimed_stage_without_a_heartbeat_yet_is_aged_from_its_start(ctx, submit, pipeline,
                                                                        dispatcher, empty_broker):
    """Claimed 5 s ago by a worker that has not beaten yet, in a job queued long before: its
    lease is young (20 s), so nothing is re-sent."""
    jid = submit()
    pipeline._claim(uuid.UUID(jid), "validate", "w")
    _age(ctx, jid, 100)
    with ctx.factory.begin() as s:
        run = s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid))).one()
        run.heartbeat_at, run.started_at = None, utcnow() - timedelta(seconds=5)
    assert _reconcile(ctx, dispatcher) == {}


def test_an_unclaimed_first_stage_waits_exactly_requeue_after_s(ctx, submit, dispatcher,
                                                                empty_broker, monkeypatch):
    jid = submit()
    with ctx.factory() as s:
        created = jobs.get_job(s, uuid.UUID(jid)).created_at
    patience = timedelta(seconds=ctx.settings.requeue_after_s)
    _at_the_edge(ctx, dispatcher, monkeypatch, created + patience, {}, {"not_picked_up": 1})


def test_the_second_stage_waits_from_the_first_ones_end_not_from_the_submission(
        ctx, submit, pipeline, dispatcher, empty_broker):
    jid = submit()
    _age(ctx, jid, 100)  # submitted long ago ...
    assert pipeline.run(jid, "validate", task_id="t1") == "slice"  # ... validate ended just now
    assert _reconcile(ctx, dispatcher) == {}  # slice's message is young


def test_a_lease_is_lost_exactly_stage_stale_after_s_after_the_last_heartbeat(
        ctx, submit, pipeline, dispatcher, empty_broker, monkeypatch):
    jid = submit()
    pipeline._claim(uuid.UUID(jid), "validate", "dead")
    beat = _run(ctx, jid, "validate").heartbeat_at
    stale = timedelta(seconds=ctx.settings.stage_stale_after_s)
    _at_the_edge(ctx, dispatcher, monkeypatch, beat + stale, {}, {"lease_expired": 1})


def test_a_stage_never_resent_waits_one_requeue_interval_after_the_jobs_last_resend(
        ctx, submit, dispatcher, empty_broker):
    """validate was never re-sent itself, but the job's last re-send (of another stage) was
    20 s ago: the wait is one requeue_after_s (30 s), not half of it."""
    jid = submit()
    _age(ctx, jid, 100)
    with ctx.factory.begin() as s:
        jobs.add_event(s, uuid.UUID(jid), "requeued", "slice", {"reason": "not_picked_up"})
    _age(ctx, jid, 20)
    assert _reconcile(ctx, dispatcher) == {"throttled": 1}


def test_every_queued_message_is_looked_at_however_long_the_queue(ctx, submit, empty_broker):
    ids = [submit() for _ in range(4)]
    ctx.settings.broker_url = REDIS_URL
    for jid in ids:
        CeleryDispatcher(ctx.settings).enqueue(jid, "validate")
    assert queued_messages(ctx.settings) == {(jid, "validate") for jid in ids}
