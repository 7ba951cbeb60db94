"""The job state machine: ``queued -> running -> succeeded | failed | cancelled``, with
``cancelling`` between ``running`` and ``cancelled``.

:func:`transition` is the only place a job's status changes; it refuses illegal moves and stamps
``started_at`` / ``finished_at``. Stage runs have their own small status set.
"""
from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Protocol

# The job statuses are part of the wire contract, so they live with the client's schemas.
from dare_client.schemas import TERMINAL, JobStatus

__all__ = ["ALLOWED", "TERMINAL", "IllegalTransition", "JobStatus", "StageStatus", "can_transition",
           "transition", "utcnow"]


ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # queued -> cancelled: nothing started, so the cancel is immediate.
    # queued -> failed: the broker refused the first message, or the first stage gave up.
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelling}),
    # A cancel is honoured between batches or at the next stage boundary; a stage may still fail.
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.failed}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class StageStatus(str, Enum):
    queued = "queued"
    running = "running"
    waiting = "waiting"  # a fanned-out stage (compare) while its parts run as their own messages
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class IllegalTransition(RuntimeError):
    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"a {current.value} job cannot become {target.value}")
        self.current = current
        self.target = target


class _HasStatus(Protocol):
    status: JobStatus
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in ALLOWED[JobStatus(current)]


def transition(job: _HasStatus, target: JobStatus, *, now: datetime | None = None) -> None:
    """Move ``job`` to ``target`` or raise :class:`IllegalTransition`; stamps the times."""
    current = JobStatus(job.status)
    target = JobStatus(target)
    if target not in ALLOWED[current]:
        raise IllegalTransition(current, target)
    now = now or utcnow()
    job.status = target
    job.updated_at = now
    if target is JobStatus.running and job.started_at is None:
        job.started_at = now
    if target.is_terminal():
        job.finished_at = now
