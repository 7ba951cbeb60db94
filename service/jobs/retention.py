"""Retention: a finished job keeps its uploaded inputs and its artifacts for
``DARE_RETENTION_DAYS`` after it ended (0 keeps them forever); then the reconciler
(:func:`service.jobs.reconciler.reconcile_once`) removes them.

The job's row, its stage runs and its events stay, with one more event, ``expired``, so the job
still answers ``GET /v1/jobs/{id}`` and says why its files are gone; a download of one of its
artifacts answers 410 ``artifact_expired``. The rows go first and the stored objects after the
commit, as when a job is cancelled: a crash in between leaves an orphan object, never a row
without its object. Jobs are taken under their row lock (``SKIP LOCKED``), so several API
replicas may run this at once.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from service.jobs import records as jobs
from service.jobs.pipeline import delete_objects
from service.settings import Settings
from service.states import TERMINAL, utcnow
from service.store.db import session_scope
from service.store.models import Artifact, Job, JobEvent, JobInput
from service.store.storage import ArtifactStore

log = logging.getLogger("dare.reconciler")

EXPIRED_EVENT = "expired"
BATCH = 100  # jobs expired per pass; the rest wait for the next one


def expire_finished(settings: Settings, factory: sessionmaker[Session], store: ArtifactStore,
                    now: datetime | None = None) -> int:
    """Remove the inputs and artifacts of jobs that ended more than ``retention_days`` ago;
    return how many jobs lost theirs."""
    if settings.retention_days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=settings.retention_days)
    has_files = (exists().where(JobInput.job_id == Job.id)
                 | exists().where(Artifact.job_id == Job.id))
    with factory() as s:
        ids = list(s.scalars(select(Job.id).where(Job.status.in_(TERMINAL),
                                                  Job.finished_at < cutoff, has_files)
                             .order_by(Job.finished_at).limit(BATCH)))
    expired = 0
    for jid in ids:
        try:
            uris = _expire_job(factory, jid, settings)
        except Exception:  # one odd job must not stop the others
            log.exception("expiring job %s failed", jid)
            continue
        if uris is not None:
            delete_objects(store, uris)  # after the commit
            expired += 1
    return expired


def _expire_job(factory: sessionmaker[Session], job_id: uuid.UUID,
                settings: Settings) -> list[str] | None:
    """Delete the job's input and artifact rows, record ``expired``; return the objects' URIs
    (to delete once committed), or None when another replica holds the job."""
    with session_scope(factory) as s:
        job = s.scalars(select(Job).where(Job.id == job_id)
                        .with_for_update(skip_locked=True)).one_or_none()
        if job is None:
            return None  # gone, or another replica holds it right now
        inputs = list(s.scalars(select(JobInput.uri).where(JobInput.job_id == job_id)))
        artifacts = list(s.scalars(select(Artifact.uri).where(Artifact.job_id == job_id)))
        s.execute(delete(JobInput).where(JobInput.job_id == job_id))
        s.execute(delete(Artifact).where(Artifact.job_id == job_id))
        # the job's JSON lists its inputs: a new version of its row tells the polled reads'
        # cache (service.jobs.pg_json) that the body it holds is stale
        job.updated_at = utcnow()
        jobs.add_event(s, job_id, EXPIRED_EVENT, None,
                       {"retention_days": settings.retention_days,
                        "inputs_removed": len(inputs), "artifacts_removed": len(artifacts)})
    log.info("job %s expired: %d inputs and %d artifacts removed", job_id, len(inputs),
             len(artifacts))
    return inputs + artifacts


def expired_at(session: Session, job_id: uuid.UUID) -> datetime | None:
    """When the job's files were removed by retention, or None."""
    return session.scalar(select(JobEvent.at).where(JobEvent.job_id == job_id,
                                                    JobEvent.kind == EXPIRED_EVENT)
                          .order_by(JobEvent.at.desc()).limit(1))
