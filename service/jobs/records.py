"""Jobs as the API sees them: create, read, list (keyset pages), cancel, events.

No FastAPI or Celery here: routes and tasks call these functions with a session. The API always
passes the caller's ``tenant_id``, so another tenant's job is indistinguishable from a missing
one; ``tenant_id=None`` (any tenant) is for the worker, which only holds ids the API created.
Domain errors (:class:`JobNotFound`, :class:`JobFinished`, :class:`InvalidCursor`) are mapped
to problem+json by ``service.api.app``.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from dare_client.schemas import ArtifactRead, EventRead, JobRead
from pydantic_core import to_json
from sqlalchemy import Connection, and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from service.jobs import webhooks
from service.jobs.urls import job_urls
from service.states import (
    IllegalTransition,
    JobStatus,
    can_transition,
    transition,
    utcnow,
)
from service.store.models import Artifact, Job, JobEvent, JobInput


class JobNotFound(LookupError):
    def __init__(self, job_id: object) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class JobFinished(RuntimeError):
    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} already {job.status.value}; only queued or running jobs "
                         "can be cancelled")
        self.job = job


class InvalidCursor(ValueError):
    pass


class StatusChanged(RuntimeError):
    """The job's row no longer holds the status this session read: another transaction moved it
    in between. Nothing was written."""

    def __init__(self, job_id: uuid.UUID, read: JobStatus, target: JobStatus) -> None:
        super().__init__(f"job {job_id} is no longer {read.value}; not moving it to {target.value}")


@dataclass
class StoredInput:
    field: str      # model | history | data
    filename: str   # as the client named it
    uri: str
    size: int
    sha256: str


def add_event(session: Session, job_id: uuid.UUID, kind: str, stage: str | None = None,
              data: dict[str, Any] | None = None) -> None:
    at = utcnow()
    session.add(JobEvent(job_id=job_id, kind=kind, stage=stage, data=data, at=at))
    # The webhook outbox row (if this job wants this event) commits or rolls back with it.
    webhooks.enqueue_for_event(session, job_id, kind, stage, at)


def create_job(session: Session, *, job_id: uuid.UUID, tenant_id: uuid.UUID, config: dict[str, Any],
               stages: list[str], model_format: str, inputs: Sequence[StoredInput],
               idempotency_key: str | None = None, request_hash: str | None = None) -> Job:
    now = utcnow()
    job = Job(id=job_id, tenant_id=tenant_id, status=JobStatus.queued, config=config,
              stages=stages, model_format=model_format, dataset=config.get("dataset"),
              stage_progress=0.0, progress=0.0, created_at=now, updated_at=now,
              idempotency_key=idempotency_key, request_hash=request_hash)
    job.inputs = [JobInput(field=i.field, filename=i.filename[:255], uri=i.uri, size=i.size,
                           sha256=i.sha256) for i in inputs]
    session.add(job)
    add_event(session, job_id, "created", data={"stages": stages})
    return job


def get_job(session: Session, job_id: uuid.UUID, *, tenant_id: uuid.UUID | None = None,
            for_update: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        stmt = stmt.where(Job.tenant_id == tenant_id)
    if for_update:  # and re-read it: the row may have changed since this session loaded it
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    job = session.scalars(stmt).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def set_status(session: Session, job: Job, target: JobStatus, *,
               now: datetime | None = None) -> None:
    """:func:`service.states.transition`, written as ``UPDATE jobs SET status = target WHERE id
    = ... AND status = <the status this session read>`` and checked by its row count, or
    :class:`StatusChanged`. Callers hold the job's lock (FOR UPDATE; BEGIN IMMEDIATE on SQLite),
    so it never fires today; it keeps a path that misses the lock from moving a job out of a
    status it has already left (a cancelled job back to running)."""
    current, target = JobStatus(job.status), JobStatus(target)
    if not can_transition(current, target):
        raise IllegalTransition(current, target)
    moved = session.execute(update(Job).where(Job.id == job.id, Job.status == current)
                            .values(status=target)
                            .execution_options(synchronize_session=False)).rowcount
    if moved != 1:
        raise StatusChanged(job.id, current, target)
    transition(job, target, now=now)  # the object follows; its flush stamps the times


# --- pages ----------------------------------------------------------------------------------

def encode_cursor(job: Job | JobView) -> str:
    raw = json.dumps({"t": job.created_at.isoformat(), "i": str(job.id)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        d = json.loads(raw)
        return datetime.fromisoformat(d["t"]), uuid.UUID(d["i"])
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidCursor(cursor) from None


# The two reads clients poll (one job, a page of jobs) skip the ORM, whose bookkeeping costs
# more than the query: Core statements, built once, of just the columns job_read needs, turned
# into JobView objects that job_read takes like a Job. No lazy loads: one job is one statement
# (its few inputs joined), a page is two whatever its size (the jobs, then their inputs: a join
# would repeat, and decode again, each job's JSON columns per input). Inputs are in id order,
# like Job.inputs; they are written with their job and never change, so the second statement
# sees exactly the page's. The API uses these on SQLite; on PostgreSQL the database writes the
# JSON itself (service.jobs.pg_json), and tests compare the two.
_J, _I = Job.__table__, JobInput.__table__
_VIEW_COLUMNS = ("id", "status", "stages", "stage_name", "stage_index", "stage_progress",
                 "progress", "created_at", "started_at", "finished_at", "error_code",
                 "error_message", "error_stage", "result", "config")
_INPUT_COLUMNS = (_I.c.field.label("in_field"), _I.c.filename.label("in_filename"),
                  _I.c.size.label("in_size"), _I.c.sha256.label("in_sha256"))


@dataclass(slots=True)
class InputView:
    field: str
    filename: str
    size: int
    sha256: str


class JobView(SimpleNamespace):
    """The :data:`_VIEW_COLUMNS` of a job and its ``inputs`` (InputView), as job_read reads them."""


_READ_ONE = (select(*(_J.c[c] for c in _VIEW_COLUMNS), *_INPUT_COLUMNS)
             .outerjoin(_I, _I.c.job_id == _J.c.id)
             .where(_J.c.id == bindparam("job_id"), _J.c.tenant_id == bindparam("tenant_id"))
             .order_by(_I.c.id))
_N = len(_VIEW_COLUMNS)
_PAGE_INPUTS = (select(_I.c.job_id, *_INPUT_COLUMNS)
                .where(_I.c.job_id.in_(bindparam("job_ids", expanding=True))).order_by(_I.c.id))


def _job_view(row: Sequence[Any]) -> JobView:
    return JobView(**dict(zip(_VIEW_COLUMNS, row[:_N])), inputs=[])


def read_job(conn: Connection | Session, job_id: uuid.UUID, *, tenant_id: uuid.UUID) -> JobView:
    rows = conn.execute(_READ_ONE, {"job_id": job_id, "tenant_id": tenant_id}).all()
    if not rows:
        raise JobNotFound(job_id)
    view = _job_view(rows[0])
    view.inputs = [InputView(*row[_N:]) for row in rows if row[_N] is not None]
    return view


@functools.cache
def _page_statement(by_status: bool, after_cursor: bool):  # noqa: ANN202
    """The page query for one combination of filters (four in all), built once: building a
    statement and computing its cache key costs more than running it."""
    stmt = select(*(_J.c[c] for c in _VIEW_COLUMNS)).where(_J.c.tenant_id == bindparam("tenant_id"))
    if by_status:
        stmt = stmt.where(_J.c.status.in_(bindparam("statuses", expanding=True)))
    if after_cursor:
        t = bindparam("after_t", type_=_J.c.created_at.type)
        i = bindparam("after_id", type_=_J.c.id.type)
        stmt = stmt.where(or_(_J.c.created_at < t, and_(_J.c.created_at == t, _J.c.id < i)))
    return stmt.order_by(_J.c.created_at.desc(), _J.c.id.desc()).limit(bindparam("limit"))


def list_jobs(conn: Connection | Session, *, tenant_id: uuid.UUID,
              statuses: Sequence[JobStatus] = (), limit: int = 20,
              cursor: str | None = None) -> tuple[list[JobView], str | None]:
    """The tenant's jobs, newest first, with their inputs. The cursor is the last row's
    (created_at, id): stable under inserts (index ix_jobs_tenant_id_created_at_id)."""
    params: dict[str, Any] = {"tenant_id": tenant_id, "limit": limit + 1}
    if statuses:
        params["statuses"] = list(statuses)
    if cursor:
        params["after_t"], params["after_id"] = decode_cursor(cursor)
    rows = conn.execute(_page_statement(bool(statuses), bool(cursor)), params).all()
    more = len(rows) > limit
    views = {row[0]: _job_view(row) for row in rows[:limit]}  # id is the first column
    if views:
        for row in conn.execute(_PAGE_INPUTS, {"job_ids": list(views)}).all():
            views[row[0]].inputs.append(InputView(*row[1:]))
    page = list(views.values())
    return page, (encode_cursor(page[-1]) if more and page else None)


def _of_tenant(stmt, job_id_col, tenant_id: uuid.UUID | None):  # noqa: ANN001, ANN202
    if tenant_id is None:
        return stmt
    return stmt.join(Job, Job.id == job_id_col).where(Job.tenant_id == tenant_id)


def list_events(session: Session, job_id: uuid.UUID, *, tenant_id: uuid.UUID | None = None,
                after: int | None = None, limit: int = 100) -> list[JobEvent]:
    stmt = _of_tenant(select(JobEvent).where(JobEvent.job_id == job_id), JobEvent.job_id, tenant_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id > after)
    return list(session.scalars(stmt.order_by(JobEvent.id).limit(limit)))


def list_artifacts(session: Session, job_id: uuid.UUID, *,
                   tenant_id: uuid.UUID | None = None) -> list[Artifact]:
    stmt = _of_tenant(select(Artifact).where(Artifact.job_id == job_id), Artifact.job_id, tenant_id)
    return list(session.scalars(stmt.order_by(Artifact.name)))


def get_artifact(session: Session, job_id: uuid.UUID, name: str, *,
                 tenant_id: uuid.UUID | None = None) -> Artifact | None:
    stmt = select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    return session.scalars(_of_tenant(stmt, Artifact.job_id, tenant_id)).one_or_none()


# --- cancel ---------------------------------------------------------------------------------

def request_cancel(session: Session, job_id: uuid.UUID, *,
                   tenant_id: uuid.UUID | None = None) -> Job:
    """queued -> cancelled at once; running -> cancelling (the worker stops between batches);
    cancelling/cancelled: nothing to do; succeeded/failed: :class:`JobFinished`."""
    job = get_job(session, job_id, tenant_id=tenant_id, for_update=True)
    status = JobStatus(job.status)
    if status in (JobStatus.cancelling, JobStatus.cancelled):
        return job
    if status in (JobStatus.succeeded, JobStatus.failed):
        raise JobFinished(job)
    job.cancel_requested_at = utcnow()
    add_event(session, job.id, "cancel_requested", job.stage_name)
    if status is JobStatus.queued:
        set_status(session, job, JobStatus.cancelled)
        add_event(session, job.id, "cancelled", job.stage_name)
    else:
        set_status(session, job, JobStatus.cancelling)
    return job


# --- reading --------------------------------------------------------------------------------

def job_read(job: Job | JobView) -> JobRead:
    return JobRead.model_validate(job_dict(job))


def job_dict(job: Job | JobView) -> dict[str, Any]:
    """The JobRead shape as plain values: job_read validates it; the polled GETs encode it as
    it is (see job_json)."""
    stages = job.stages or []
    if job.stage_name is None and stages:  # queued: show the stage it will start with
        stage = {"name": stages[0], "index": 0, "total": len(stages), "progress": 0.0}
    else:
        stage = {"name": job.stage_name, "index": job.stage_index, "total": len(stages),
                 "progress": _unit(job.stage_progress)}
    error = ({"code": job.error_code, "message": job.error_message or "",
              "stage": job.error_stage} if job.error_code else None)
    return {
        "id": job.id, "status": job.status, "stage": stage, "progress": _unit(job.progress),
        "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "error": error, "result": job.result,
        "urls": job_urls(job), "config": job.config,
        "inputs": [{"field": i.field, "filename": i.filename, "size": i.size, "sha256": i.sha256}
                   for i in job.inputs]}


# The polled GETs answer with these bytes themselves (a Response, not a model for FastAPI to
# validate and encode): job_dict's values, in JobRead's field order, encoded by pydantic-core,
# the encoder FastAPI's response_model uses, so the bytes are the same (a UUID, a datetime, an
# enum are written by their type either way; tests/service/test_read_cost.py compares them)
# without building and checking twenty models per page.
def job_json(job: Job | JobView) -> bytes:
    return to_json(job_dict(job))


def page_json(page: Sequence[Job | JobView], next_cursor: str | None) -> bytes:
    return to_json({"items": [job_dict(j) for j in page], "next_cursor": next_cursor})


def event_read(e: JobEvent) -> EventRead:
    return EventRead(id=e.id, at=e.at, kind=e.kind, stage=e.stage, data=e.data)


def artifact_read(a: Artifact) -> ArtifactRead:
    return ArtifactRead(name=a.name, size=a.size, sha256=a.sha256, media_type=a.media_type,
                        url=f"/v1/jobs/{a.job_id}/artifacts/{a.name}")


def _unit(x: float | None) -> float:
    return min(1.0, max(0.0, float(x or 0.0)))
