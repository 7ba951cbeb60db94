"""A cancel and a claim racing for the same job, interleaved deterministically on SQLite and on
PostgreSQL: whichever commits first, a job the API called cancelled never runs, and a job claimed
first ends cancelled without doing the stage's work. Plus SQLite writers wait for each other
(busy timeout) instead of failing or losing updates.

The interleaving uses no sleeps: the claim pauses at ``Pipeline.after_claim_read`` (or the test
holds the cancel's transaction open), and the other side is let go once it is about to take its
lock (a statement that begins a SQLite write transaction or selects FOR UPDATE), after which it
can only proceed when the first side commits.
"""
from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, select, text, update

from service.jobs import records as jobs
from service.jobs.pipeline import Pipeline
from service.states import JobStatus, StageStatus, utcnow
from service.store.db import make_engine, session_factory, upgrade
from service.store.models import JobEvent, StageRun, Tenant
from worker.engine.errors import Cancelled

from .conftest import RecordingDispatcher, make_key, submit_files

WAIT_S = 30  # only ever reached when something is broken


@pytest.fixture(params=["postgresql", "sqlite"])
def db_client(request, settings, tmp_path):
    """The API (keys on, tenant t1) on each database; background housekeeping off so only the
    test's threads touch the job."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    s = settings.model_copy(update={"reconcile_interval_s": 0, "webhook_poll_interval_s": 0})
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'atomic.db'}"
        upgrade(url)
        s = s.model_copy(update={"database_url": url})
    app = create_app(s, dispatcher=RecordingDispatcher())
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, 't1')}"
        yield c
    app.state.ctx.engine.dispose()


class LockWatch:
    """Sets ``event`` when ``thread`` is about to run a statement that takes the job's lock or
    the database's write lock; from then on that thread cannot overtake a transaction that
    already holds it."""

    LOCKING = ("BEGIN IMMEDIATE", "FOR UPDATE", "UPDATE ", "INSERT ", "DELETE ")

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.engine = engine
        self.thread: threading.Thread | None = None
        self.event = threading.Event()

    def _before(self, conn, cursor, statement, *args) -> None:  # noqa: ANN001
        if threading.current_thread() is self.thread and \
                any(k in statement.upper() for k in self.LOCKING):
            self.event.set()

    def __enter__(self) -> LockWatch:
        event.listen(self.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)


def _submit(client, subject_bytes) -> uuid.UUID:  # noqa: ANN001
    files, data = submit_files(subject_bytes)
    r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 202, r.text
    return uuid.UUID(r.json()["id"])


def _cancel(factory, jid: uuid.UUID) -> JobStatus:  # noqa: ANN001
    """What POST /v1/jobs/{id}/cancel does: read the job, cancel it under its lock, commit."""
    with factory() as s:
        jobs.get_job(s, jid)
        status = jobs.request_cancel(s, jid).status
        s.commit()
    return JobStatus(status)


def _state(factory, jid: uuid.UUID) -> tuple[JobStatus, StageStatus | None, list[str]]:  # noqa: ANN001
    with factory() as s:
        job = jobs.get_job(s, jid)
        run = s.scalars(select(StageRun).where(StageRun.job_id == jid,
                                               StageRun.name == "validate")).one_or_none()
        kinds = list(s.scalars(select(JobEvent.kind).where(JobEvent.job_id == jid)
                               .order_by(JobEvent.id)))
    return JobStatus(job.status), (run.status if run else None), kinds


def _stage_that_records(worked: list[str], first: threading.Event | None = None):  # noqa: ANN202
    def runner(name, sctx):  # noqa: ANN001, ANN202
        if first is not None:  # the test says when the stage reaches its first check
            assert first.wait(WAIT_S)
        if sctx.cancelled():  # the engine's first check, before any batch
            raise Cancelled()
        worked.append(name)
        return {}
    return runner


def _in_thread(fn, *args):  # noqa: ANN001, ANN202
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (re-raised by the test)
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    return t, out


def test_a_cancel_during_a_claim_waits_for_it_and_the_stage_does_no_work(db_client, subject_bytes):
    ctx = db_client.app.state.ctx
    jid = _submit(db_client, subject_bytes)
    worked: list[str] = []
    paused, resume = threading.Event(), threading.Event()

    def pause(job_id: uuid.UUID, stage: str) -> None:
        paused.set()
        assert resume.wait(WAIT_S), "the test never let the claim go on"

    cancelled = threading.Event()  # the stage checks for a cancel only once it has answered
    p = Pipeline(ctx.settings, ctx.factory, ctx.store,
                 runner=_stage_that_records(worked, first=cancelled))
    p.after_claim_read = pause
    claim, claim_out = _in_thread(p.run, str(jid), "validate", "task-a")
    claim.start()
    assert paused.wait(WAIT_S)  # the claim has read "queued" and holds the job

    cancel, cancel_out = _in_thread(_cancel, ctx.factory, jid)
    with LockWatch(ctx.engine) as watch:
        watch.thread = cancel
        cancel.start()
        # Let the claim go once the cancel is at its lock, or done (the race this test guards
        # against: a cancel that got through while the claim held the job).
        while not watch.event.wait(0.05) and cancel.is_alive():
            pass
        resume.set()
        cancel.join(WAIT_S)
        cancelled.set()
        claim.join(WAIT_S)
    assert not claim.is_alive() and not cancel.is_alive()
    for out in (claim_out, cancel_out):
        if "error" in out:
            raise out["error"]

    # The cancel waited for the claim's commit (no "database is locked"), saw "running" and
    # answered "cancelling": it never answered "cancelled" for a job that then ran.
    assert cancel_out["value"] is JobStatus.cancelling
    status, run, kinds = _state(ctx.factory, jid)
    assert (status, run) == (JobStatus.cancelled, StageStatus.cancelled)
    assert worked == []  # the stage saw the cancel at its first check
    assert kinds.index("stage_started") < kinds.index("cancel_requested") < kinds.index("cancelled")
    assert claim_out["value"] is None  # nothing enqueued after the cancel


def test_a_claim_during_a_cancel_waits_and_then_skips_the_stage(db_client, subject_bytes):
    ctx = db_client.app.state.ctx
    jid = _submit(db_client, subject_bytes)
    worked: list[str] = []
    p = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=_stage_that_records(worked))
    claim, claim_out = _in_thread(p.run, str(jid), "validate", "task-a")

    with ctx.factory() as s, LockWatch(ctx.engine) as watch:
        jobs.get_job(s, jid)
        answered = jobs.request_cancel(s, jid).status  # holds the job until the commit below
        watch.thread = claim
        claim.start()
        while not watch.event.wait(0.05) and claim.is_alive():
            pass
        s.commit()
    claim.join(WAIT_S)
    assert not claim.is_alive()
    if "error" in claim_out:
        raise claim_out["error"]

    assert JobStatus(answered) is JobStatus.cancelled
    status, run, kinds = _state(ctx.factory, jid)
    assert status is JobStatus.cancelled and run is None  # never claimed
    assert worked == [] and "stage_started" not in kinds
    assert claim_out["value"] is None
    # A redelivered message later changes nothing either.
    assert p.run(str(jid), "validate", "task-b") is None
    assert _state(ctx.factory, jid)[:2] == (JobStatus.cancelled, None)


# --- SQLite writers ---------------------------------------------------------------------------

def test_sqlite_transactions_begin_immediate_with_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    with engine.connect() as c:
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        c.execute(text("SELECT 1"))
    assert seen == ["BEGIN IMMEDIATE", "PRAGMA busy_timeout", "SELECT 1"]  # BEGIN comes first
    engine.dispose()


def test_sqlite_read_modify_write_from_many_threads_waits_and_loses_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    tid = uuid.uuid4()
    with factory.begin() as s:
        s.add(Tenant(id=tid, name="counter", max_active_jobs=0,
                     created_at=utcnow()))

    def bump(_: int) -> None:  # read, then write what was read plus one: a lost update shows
        with factory.begin() as s:
            n = s.scalar(select(Tenant.max_active_jobs).where(Tenant.id == tid))
            s.execute(update(Tenant).where(Tenant.id == tid).values(max_active_jobs=n + 1))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(bump, range(200)))  # any "database is locked" would raise here
    with factory() as s:
        assert s.scalar(select(Tenant.max_active_jobs).where(Tenant.id == tid)) == 200
    engine.dispose()


# --- the second line of defence: status moves are conditional updates ---------------------------

def test_a_status_move_checks_the_row_still_holds_the_status_it_read(db_client, subject_bytes):
    """Without any lock (SQLite with pysqlite's own lazy BEGIN, as before the fix; PostgreSQL
    without FOR UPDATE), a claim that read "queued" before a cancel committed cannot write
    "running": the UPDATE ... WHERE status = 'queued' matches no row, and nothing is written."""
    ctx = db_client.app.state.ctx
    jid = _submit(db_client, subject_bytes)
    unlocked = make_engine(ctx.settings.database_url, begin_immediate=False)
    try:
        with session_factory(unlocked)() as s:
            job = jobs.get_job(s, jid)  # reads "queued", takes no lock
            assert _cancel(ctx.factory, jid) is JobStatus.cancelled  # commits meanwhile
            with pytest.raises(jobs.StatusChanged, match="no longer queued"):
                jobs.set_status(s, job, JobStatus.running)
            s.rollback()
    finally:
        unlocked.dispose()
    assert _state(ctx.factory, jid)[0] is JobStatus.cancelled
